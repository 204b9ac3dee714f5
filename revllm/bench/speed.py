"""Table 2: step time at the same batch, as a ratio to (a), all configurations in one process.

Steps are interleaved (round r runs every configuration once, in an order rotated by r) so that
machine-load drift hits every configuration alike; each figure is the median of ``repeats`` steps.
Several batch sizes can be given, which turns the table into a tokens/s-vs-batch sweep.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm import tqdm

from .configs import Spec, build_model, make_batch, preallocate_grads, sync, train_step
from .memory import envelope


def speed_table(configs, batches, base: Spec, repeats=5, warmup=1, command="", profile=False) -> dict:
    models = {}
    for c in configs:
        spec = Spec(**{**base.to_dict(), "config": c})
        model = build_model(spec)
        preallocate_grads(model)
        models[c] = (spec, model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times = {(c, b): [] for c in configs for b in batches}
    data = {b: make_batch(base, b) for b in batches}
    failed = {}
    bar = tqdm(total=len(configs) * len(batches) * (warmup + repeats), desc="speed", unit="step")
    for r in range(warmup + repeats):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for b in batches:
            for c in order:
                bar.update()
                if (c, b) in failed:
                    continue
                spec, model, opt = models[c]
                sync(spec.device)
                t0 = time.perf_counter()
                try:
                    train_step(model, data[b], spec, opt)
                except (torch.OutOfMemoryError, MemoryError) as e:  # record it; the other rows still run
                    failed[(c, b)] = " ".join(str(e).split())[:200]
                    opt.zero_grad(set_to_none=False)
                    if spec.device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                sync(spec.device)
                if r >= warmup:
                    times[(c, b)].append(time.perf_counter() - t0)
    bar.close()
    rows = []
    for b in batches:
        ref = statistics.median(times[("euler", b)]) if times.get(("euler", b)) else None
        for c in configs:
            if (c, b) in failed:
                rows.append({"config": c, "batch": b, "ok": False, "reason": "oom", "detail": failed[(c, b)]})
                continue
            med = statistics.median(times[(c, b)])
            row = {
                "config": c,
                "batch": b,
                "ok": True,
                "times": times[(c, b)],
                "median_s": med,
                "tokens_per_s": b * base.seq / med,
                "ratio_to_a": None if ref is None else med / ref,
            }
            if profile:
                row["profile"] = _profile_step(*models[c], data[b])
            rows.append(row)
    setup = {
        **{k: v for k, v in base.to_dict().items() if k not in ("config", "batch")},
        "batches": list(batches),
        "repeats": repeats,
        "warmup": warmup,
    }
    return envelope("speed", base.device, setup, rows, command)


def _profile_step(spec: Spec, model, opt, ids, top: int = 8) -> dict:
    """One profiled step: the operators with the most self time, and the share of the LM-head loss."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec.device == "cuda" else [])
    with profile(activities=acts) as prof:
        with record_function("step"):
            train_step(model, ids, spec, opt)
        sync(spec.device)
    key = "self_device_time_total" if spec.device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return {
        "metric": key,
        "top": [{"op": e.key, "share": getattr(e, key) / total, "calls": e.count} for e in events[:top]],
    }
