"""One measurement in a fresh process: ``python -m revllm.bench.worker '<json>'`` prints one JSON line.

A fresh process per row is what makes the CPU peak honest: ``ru_maxrss`` is a high-water mark that
never goes down, and allocator caches from an earlier, larger configuration would otherwise count.

Tasks (``"task"`` in the JSON, the rest is a ``configs.Spec``):
  ``memory``      one forward + backward: bytes saved for backward and the step's peak memory
  ``probe``       one full forward + backward + AdamW step under the memory budget: ok or not
  ``throughput``  warm-up steps then timed full steps: tokens/s
  ``train``       ``steps`` full AdamW steps from cold, as ``revllm train`` runs them: the process's peak
Every task reports the whole process's peak (``peak_bytes``: peak RSS on CPU; on CUDA torch's
max_memory_allocated, with max_memory_reserved next to it) and the step's share of it (``peak_step_bytes``).
Allocator (``"allocator"`` in the JSON): ``revllm`` (default) applies ``revllm.memory.configure_allocator``
as the product does; ``system`` leaves malloc as it is. The driver may also preload another allocator.
Memory budget (``budget_bytes``): on CPU enforced with RLIMIT_AS (allocation beyond it fails) and checked
against the measured RSS high-water mark; on CUDA the card is the budget unless one is given.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback

import torch

from ..memory import (
    SavedBytes,
    configure_allocator,
    cpu_seconds,
    kernel_work,
    peak_rss_bytes,
    rss_bytes,
    vm_bytes,
)
from .configs import Spec, build_model, make_batch, preallocate_grads, sync, train_step
from .finetune import run_row
from .process import PREFIX


class _OverBudget(Exception):
    pass


def _enforce_budget(budget: int | None, device: str):
    if budget is None:
        return
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
        return
    rss = rss_bytes()
    if rss >= budget:
        raise _OverBudget(f"the model alone takes {rss / 2**20:.0f} MiB RSS, over the {budget / 2**20:.0f} MiB budget")
    # Address space grows with every large tensor touched, so capping it at (now + headroom) makes an
    # allocation past the budget fail inside torch instead of pushing the machine into swap/OOM-kill.
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + budget - rss, hard))


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("alloc" in msg or "out of memory" in msg or "mmap" in msg)


def _measure(task: str, out: dict, model, ids, spec: Spec, opt, steps: int, warmup: int) -> None:
    """The task's measurement, under the budget; its figures go into ``out`` as they are taken."""
    if task == "memory":
        t0 = time.perf_counter()
        counter = SavedBytes(model)
        with counter:
            with torch.autocast(spec.device, dtype=torch.bfloat16, enabled=spec.dtype == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
        out["saved_bytes"] = counter.bytes
        out["saved_tensors"] = counter.tensors
        loss.backward()
        sync(spec.device)
        out["step_seconds"] = time.perf_counter() - t0
    elif task == "probe":
        t0 = time.perf_counter()
        train_step(model, ids, spec, opt)
        sync(spec.device)
        out["step_seconds"] = time.perf_counter() - t0
    elif task == "train":
        times, cpu, sys_s, faults = [], [], [], []
        for _ in range(steps):
            t0, c0, (s0, f0) = time.perf_counter(), cpu_seconds(), kernel_work()
            train_step(model, ids, spec, opt)
            times.append(time.perf_counter() - t0)
            cpu.append(cpu_seconds() - c0)  # user + system: page faults of mmapped tensors count here
            s1, f1 = kernel_work()
            sys_s.append(s1 - s0)
            faults.append(f1 - f0)
        out["step_times"], out["step_cpu_times"] = times, cpu
        out["step_sys_times"], out["step_minor_faults"] = sys_s, faults
    elif task == "throughput":
        for _ in range(warmup):
            train_step(model, ids, spec, opt)
        sync(spec.device)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(model, ids, spec, opt)
            sync(spec.device)
            times.append(time.perf_counter() - t0)
        out["step_times"] = times
        out["tokens_per_s"] = spec.batch * spec.seq * len(times) / sum(times)
    else:
        raise ValueError(f"unknown task {task!r}; use memory, probe or throughput")


def run(job: dict) -> dict:
    task = job.pop("task")
    allocator = job.pop("allocator", "revllm")
    if allocator == "revllm":
        configure_allocator()
    elif allocator != "system":
        raise ValueError(f"unknown allocator {allocator!r}; use revllm or system")
    budget = job.pop("budget_bytes", None)
    if task == "finetune":
        return _finetune(job, budget)
    steps, warmup = int(job.pop("steps", 3)), int(job.pop("warmup", 1))
    spec = Spec(**job)
    out = {"task": task, **spec.to_dict(), "budget_bytes": budget, "allocator": allocator}
    cuda = spec.device == "cuda"
    model = build_model(spec)
    out["params"] = sum(p.numel() for p in model.parameters())
    ids = make_batch(spec)
    opt = None
    if task in ("probe", "throughput", "train"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)  # foreach would add a transient copy
    preallocate_grads(model)
    if task == "memory":
        # Warm-up at batch 1 on a short sequence: lazily loaded kernels and thread pools are then
        # resident before rss_before is read, so they do not count as the step's peak.
        train_step(model, make_batch(spec, 1)[:, : min(spec.seq, 16)], spec)
        for p in model.parameters():
            p.grad.zero_()
    sync(spec.device)
    out["rss_before_bytes"] = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        out["allocated_before_bytes"] = torch.cuda.memory_allocated()
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    try:
        _enforce_budget(budget, spec.device)
        _measure(task, out, model, ids, spec, opt, steps, warmup)
        out["ok"] = True
    except _OverBudget as e:
        out.update(ok=False, reason="model_over_budget", detail=str(e))
    except Exception as e:  # broad on purpose: any failure is a result to record, OOM or not
        if not _is_oom(e):
            raise
        out.update(ok=False, reason="oom", detail=" ".join(str(e).split())[:300])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["peak_step_bytes"] = out["peak_bytes"] - out["allocated_before_bytes"]
    else:
        out["peak_bytes"] = peak_rss_bytes()
        out["peak_step_bytes"] = max(0, out["peak_bytes"] - out["rss_before_bytes"])
    if out["ok"] and budget is not None and out["peak_bytes"] > budget:
        out.update(
            ok=False,
            reason="over_budget",
            detail=f"peak {out['peak_bytes'] / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB",
        )
    return out


def _finetune(job: dict, budget: int | None) -> dict:
    """One row of ``revllm bench finetune`` under the memory limit (see bench/finetune.py)."""
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    try:
        out = run_row(job, before_steps=lambda: _enforce_budget(budget, "cpu"))
        out["ok"] = True
    except _OverBudget as e:
        out = {"ok": False, "reason": "model_over_budget", "detail": str(e)}
    except Exception as e:  # broad on purpose: an OOM is a result to record
        if not _is_oom(e):
            raise
        out = {"ok": False, "reason": "oom", "detail": " ".join(str(e).split())[:300]}
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m revllm.bench.worker '<json job>'", file=sys.stderr)
        return 2
    try:
        result = run(json.loads(argv[0]))
    except Exception as e:  # broad on purpose: reported to the driver as one JSON line
        result = {"ok": False, "reason": "error", "detail": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        traceback.print_exc()
    print(PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
