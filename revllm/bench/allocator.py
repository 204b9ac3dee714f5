"""``revllm bench allocator``: the whole-process peak of training vs depth, per allocator setting.

Each row is a fresh process running ``steps`` AdamW steps from cold (the worker's ``train`` task), with
  ``system``   glibc malloc as it comes (its dynamic mmap threshold),
  ``revllm``   ``revllm.memory.configure_allocator`` (what revllm train / finetune / convert apply),
  ``<name>``   for each ``--preload NAME=PATH``: that allocator via LD_PRELOAD (e.g. Debian's libjemalloc2),
               and for each ``--setting NAME=VAR=VALUE``: glibc malloc under those MALLOC_* tunables.
The settings run one after another for each (configuration, depth), so their step times are interleaved
and comparable on a shared machine. Growth = peak RSS minus the RSS of the built model (grads allocated).
"""

from __future__ import annotations

import statistics

from tqdm import tqdm

from .configs import Spec
from .memory import envelope
from .process import spawn


def allocator_table(
    configs,
    depths,
    base: Spec,
    steps: int,
    preloads: dict,
    settings=None,
    threads=None,
    command="",
    worker=spawn,
    on_row=None,
) -> dict:
    variants = [("system", "system", {}), ("revllm", "revllm", {})]
    variants += [(name, "system", {"LD_PRELOAD": path}) for name, path in preloads.items()]
    # glibc reads MALLOC_*_ tunables at start-up; configure_allocator leaves such a process alone.
    variants += [(name, "system", dict(env)) for name, env in (settings or {}).items()]
    extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    setup = {
        **{k: v for k, v in base.to_dict().items() if k not in ("config", "layers")},
        "depths": list(depths),
        "steps": steps,
        "allocators": [v[0] for v in variants],
        "preloads": preloads,
        "settings": settings or {},
        "threads": threads,
    }
    rows = []
    bar = tqdm(total=len(configs) * len(depths) * len(variants), desc="allocator", unit="row")
    for c in configs:
        for L in depths:
            for name, alloc, env in variants:
                bar.set_postfix_str(f"{c} L={L} {name}")
                job = {"task": "train", **base.to_dict(), "config": c, "layers": L, "steps": steps, "allocator": alloc}
                row = {**worker(job, env={**env, **extra}), "variant": name}
                if row.get("ok"):
                    row["growth_bytes"] = row["peak_bytes"] - row["rss_before_bytes"]
                rows.append(row)
                bar.update()
                if on_row is not None:
                    on_row(envelope("allocator", base.device, setup, rows, command))
    bar.close()
    return envelope("allocator", base.device, setup, rows, command)


def step_time_ratio(rows, variant: str, baseline: str = "system", key: str = "step_times") -> float | None:
    """Geometric mean over (config, depth) of the median step time (first step excluded) of ``variant``
    over ``baseline``'s, measured back to back. ``key="step_cpu_times"``: CPU seconds (user + system) per
    step, which a shared machine's load disturbs less than wall time."""

    def med(r):
        t = r[key][1:] or r[key]
        return statistics.median(t)

    by = {(r["config"], r["layers"], r["variant"]): r for r in rows if r.get("ok") and key in r}
    ratios = [
        med(by[(c, L, variant)]) / med(by[(c, L, baseline)])
        for (c, L, v) in by
        if v == baseline and (c, L, variant) in by
    ]
    return statistics.geometric_mean(ratios) if ratios else None


def growth_ratio(rows, variant: str, memory_free: str, stored: str) -> tuple[float, float, float] | None:
    """(memory-free growth of the peak from the shallowest to the deepest depth, the stored model's
    growth, their ratio); the target is ratio <= 0.10."""

    def grow(c, v):
        pts = sorted(
            (r["layers"], r["peak_bytes"]) for r in rows if r.get("ok") and r["config"] == c and r["variant"] == v
        )
        return pts[-1][1] - pts[0][1] if len(pts) >= 2 else None

    a, b = grow(memory_free, variant), grow(stored, variant)
    if a is None or not b:
        return None
    return a, b, a / b
