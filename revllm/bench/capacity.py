"""Table 3: the largest batch that fits a memory budget, and tokens/s at that batch.

The search doubles the batch until a probe fails, then bisects between the last success and the first
failure. Each probe is a full forward + backward + AdamW step in a fresh process (``worker.py``), so
allocator state never carries over between probes. ``tolerance`` stops the bisection once the bracket
is within that fraction of the best batch (0 = exact), which bounds the number of slow probes on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm

from ..errors import RevLLMError
from .configs import Spec, config_kind
from .memory import envelope
from .process import spawn


def search_max_batch(
    probe: Callable[[int], bool], start: int = 1, cap: int = 1 << 16, tolerance: float = 0.0
) -> tuple[int, list[tuple[int, bool]], bool]:
    """Largest batch b <= cap with probe(b) True, assuming fit is monotone in b.

    Returns (best, trace of (batch, ok) in probe order, capped). best is 0 when ``start`` fails.
    """
    if start < 1 or cap < start:
        raise ValueError(f"need 1 <= start <= cap, got start={start}, cap={cap}")
    trace = []

    def run(b):
        ok = bool(probe(b))
        trace.append((b, ok))
        return ok

    lo, hi = 0, None  # lo: largest success; hi: smallest failure
    b = start
    while True:
        if run(b):
            lo = b
            if b >= cap:
                return lo, trace, True
            b = min(2 * b, cap)
        else:
            hi = b
            break
    while hi - lo > max(1, int(tolerance * lo)):
        mid = (lo + hi) // 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return lo, trace, False


def capacity_table(
    configs,
    depths,
    base: Spec,
    budget=None,
    start=1,
    cap=1 << 16,
    tolerance=0.0,
    steps=3,
    warmup=1,
    command="",
    worker=spawn,
    on_row=None,
    resume_rows=(),
) -> dict:
    """``on_row(partial_result)`` is called after every (depth, configuration), so partial runs are kept.
    ``resume_rows``: rows of an interrupted run; a finished search is reused, a missing throughput is measured.
    The throughput run is not capped by the budget: the batch was chosen under it, and allocator
    fragmentation over several steps may lift RSS slightly above the single-step probe (its peak is recorded)."""
    done = {(r["config"], r["layers"]): r for r in resume_rows if "max_batch" in r}
    rows = []
    setup = {
        **{k: v for k, v in base.to_dict().items() if k not in ("config", "layers", "batch")},
        "depths": list(depths),
        "budget_bytes": budget,
        "start": start,
        "cap": cap,
        "tolerance": tolerance,
        "steps": steps,
        "warmup": warmup,
    }
    bar = tqdm(desc="capacity", unit="probe")
    for L in depths:
        for c in configs:
            job = {**base.to_dict(), "config": c, "layers": L, "budget_bytes": budget}
            if (c, L) in done:
                row = dict(done[(c, L)])
                row.setdefault("budget_bytes", budget)
                if row["max_batch"] and not row.get("tokens_per_s"):
                    _throughput(row, job, worker, steps, warmup)
                    bar.update()
                rows.append(row)
                relative(rows)
                continue
            probes = []

            def probe(b):
                res = worker({"task": "probe", **job, "batch": b})
                bar.update()
                bar.set_postfix_str(f"{c} L={L} b={b} {'ok' if res.get('ok') else res.get('reason')}")
                probes.append(
                    {k: res.get(k) for k in ("batch", "ok", "reason", "detail", "peak_bytes", "step_seconds")}
                )
                if res.get("reason") == "error":
                    raise RevLLMError(f"probe {c} L={L} batch={b} failed: {res.get('detail')}")
                if res.get("reason") == "model_over_budget":
                    raise RevLLMError(f"--memory-budget is too small for {c} at {L} layers: {res['detail']}")
                return res.get("ok")

            best, _, capped = search_max_batch(probe, start=start, cap=cap, tolerance=tolerance)
            row = {
                "config": c,
                "layers": L,
                "budget_bytes": budget,
                "max_batch": best,
                "capped": capped,
                "probes": probes,
            }
            if best:
                _throughput(row, job, worker, steps, warmup)
                bar.update()
            rows.append(row)
            relative(rows)
            if on_row is not None:
                on_row(envelope("capacity", base.device, setup, rows, command))
    bar.close()
    relative(rows)
    return envelope("capacity", base.device, setup, rows, command)


def _throughput(row, job, worker, steps, warmup):
    res = worker(
        {"task": "throughput", **job, "budget_bytes": None, "batch": row["max_batch"], "steps": steps, "warmup": warmup}
    )
    row.update(
        tokens_per_s=res.get("tokens_per_s"),
        throughput_ok=res.get("ok"),
        throughput_reason=res.get("reason"),
        step_times=res.get("step_times"),
        peak_bytes=res.get("peak_bytes"),
    )


def relative(rows):
    """Throughput relative to (a) and (b) at the same depth, in percent."""
    for r in rows:
        for kind, key in (("a", "vs_a"), ("b", "vs_b")):
            ref = next((q for q in rows if q["layers"] == r["layers"] and config_kind(q["config"]) == kind), None)
            if ref and ref is not r and ref.get("tokens_per_s") and r.get("tokens_per_s"):
                r[key] = 100.0 * (r["tokens_per_s"] / ref["tokens_per_s"] - 1.0)
