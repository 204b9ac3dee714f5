"""Table 2: step time at the same batch, as a ratio to (a), all configurations in one process.

Steps are interleaved (round r runs every configuration once, in an order rotated by r) so that
machine-load drift hits every configuration alike; each figure is the median of ``repeats`` steps.
Several batch sizes can be given, which turns the table into a tokens/s-vs-batch sweep.
"""
from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from .configs import Spec, build_model, make_batch, preallocate_grads, sync, train_step
from .memory import envelope


def speed_table(configs, batches, base: Spec, repeats=5, warmup=1, command="") -> dict:
    models = {}
    for c in configs:
        spec = Spec(**{**base.to_dict(), "config": c})
        model = build_model(spec)
        preallocate_grads(model)
        models[c] = (spec, model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times = {(c, b): [] for c in configs for b in batches}
    data = {b: make_batch(base, b) for b in batches}
    bar = tqdm(total=len(configs) * len(batches) * (warmup + repeats), desc="speed", unit="step")
    for r in range(warmup + repeats):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for b in batches:
            for c in order:
                spec, model, opt = models[c]
                sync(spec.device)
                t0 = time.perf_counter()
                train_step(model, data[b], spec, opt)
                sync(spec.device)
                if r >= warmup:
                    times[(c, b)].append(time.perf_counter() - t0)
                bar.update()
    bar.close()
    rows = []
    for b in batches:
        ref = statistics.median(times[("euler", b)]) if "euler" in configs else None
        for c in configs:
            med = statistics.median(times[(c, b)])
            rows.append({"config": c, "batch": b, "times": times[(c, b)], "median_s": med,
                         "tokens_per_s": b * base.seq / med, "ratio_to_a": None if ref is None else med / ref})
    setup = {**{k: v for k, v in base.to_dict().items() if k not in ("config", "batch")},
             "batches": list(batches), "repeats": repeats, "warmup": warmup}
    return envelope("speed", base.device, setup, rows, command)
