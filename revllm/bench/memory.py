"""Table 1: bytes saved for backward and peak memory vs depth, one fresh process per row.

Rows that cannot finish are recorded as skipped, with the reason, rather than dropped: a row is
skipped without running when a straight line through the configuration's two previous rows predicts
it over ``budget`` or ``max_seconds`` (on CPU the stored configurations at 48/96 layers need many GB
and minutes), and fails as ``oom``/``timeout`` when the prediction was too optimistic.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from .configs import Spec, machine, machine_tag
from .process import spawn


def _extrapolate(points: list[tuple[int, float]], x: int) -> float | None:
    if len(points) < 2:  # one point cannot separate the fixed cost (interpreter, model) from the slope
        return None
    (x0, y0), (x1, y1) = points[-2:]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


def memory_table(
    configs, depths, base: Spec, budget=None, max_seconds=None, command="", worker=spawn, on_row=None
) -> dict:
    """``on_row(partial_result)`` is called after every row, so a long run can be saved as it goes."""
    rows = []
    setup = {
        **{k: v for k, v in base.to_dict().items() if k not in ("config", "layers")},
        "depths": list(depths),
        "budget_bytes": budget,
        "max_seconds": max_seconds,
    }
    bar = tqdm(total=len(configs) * len(depths), desc="memory", unit="row")
    for c in configs:
        walls, peaks = [], []
        for L in depths:
            job = {"task": "memory", **base.to_dict(), "config": c, "layers": L, "budget_bytes": budget}
            bar.set_postfix_str(f"{c} L={L}")
            pw, pp = _extrapolate(walls, L), _extrapolate(peaks, L)
            if max_seconds is not None and pw is not None and pw > max_seconds:
                row = {
                    **job,
                    "ok": False,
                    "reason": "predicted_time",
                    "detail": f"~{pw:.0f}s > --max-seconds {max_seconds:g}",
                }
            elif budget is not None and pp is not None and pp > budget:
                row = {
                    **job,
                    "ok": False,
                    "reason": "predicted_memory",
                    "detail": f"~{pp / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB",
                }
            else:
                t0 = time.perf_counter()
                row = worker(job, timeout=max_seconds)
                row["wall_seconds"] = time.perf_counter() - t0
                if row.get("ok"):
                    walls.append((L, row["wall_seconds"]))
                    peaks.append((L, row["peak_bytes"]))
            rows.append(row)
            bar.update()
            if on_row is not None:
                on_row(envelope("memory", base.device, setup, rows, command))
    bar.close()
    return envelope("memory", base.device, setup, rows, command)


def envelope(table: str, device: str, setup: dict, rows: list, command: str, name: str | None = None) -> dict:
    return {
        "table": table,
        "name": name or table,
        "machine_tag": machine_tag(device),
        "machine": machine(device),
        "setup": setup,
        "command": command,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }
