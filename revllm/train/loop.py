"""The training loop, readable top to bottom.

Reusable entry point::

    train(cfg, model=None, loss_fn=None, teacher=None, explicit=None) -> summary dict

* ``cfg``: a ``TrainConfig`` (see config.py). ``cfg.data`` is a token dir from ``revllm data``.
* ``model``: a ready ``PreTrainedModel`` to train; default: a new ``RevLLMForCausalLM`` from ``cfg``, or the
  model in ``cfg.init_from``, or the checkpoint's on ``cfg.resume``.
* ``loss_fn(model, batch) -> (loss, metrics)``: ``batch`` is ``{"input_ids": LongTensor (B, T)}`` on the
  device; ``metrics`` a dict of floats; those the loss_fn names in its ``metric_names`` attribute get their
  own metrics.csv columns and TensorBoard tags next to the loss. Default: causal-LM cross-entropy
  (``causal_lm_loss``). Distillation passes a closure over ``teacher``.
* ``teacher``: an optional frozen module; the loop only places it on the device in eval mode with
  ``requires_grad_(False)`` (the loss_fn uses it).
* ``explicit``: the config keys the user set explicitly; on ``--resume`` only those in
  ``RESUME_MUTABLE`` may differ from the checkpoint's config.

Device placement, mixed precision (bf16 autocast on a bf16-capable GPU, fp32 on CPU) and gradient-sync
control go through ``accelerate.Accelerator``, so ``accelerate launch`` / ``torchrun`` need no rewrite.
Several processes: ``cfg.parallel`` = ``ddp`` (accelerate's DDP wrapper) or ``fsdp2`` (revllm.parallel
shards each layer; accelerate only places the optimizer). ``batch_size`` is per process: every rank draws
the same global batch of a whole step (``batch_size x processes x grad_accum`` rows) from the shared sampler
and takes its own rows of each micro-batch, so rank 0's sampler state is the run's. Checkpoints keep the
single-process format (FSDP2 gathers full state). A resume on another number of processes keeps the
global batch by changing grad_accum (said in one line), or is refused when that cannot be done.
Validation scores the same windows whatever the number of processes (eval_iters x the global batch),
split over the ranks and averaged over all of them. A resume keeps the lr schedule it was planned with
(``schedule_steps``): a larger --max-steps continues at the schedule's final lr, said in one line.
Only parameters and optimizer state that are all finite are saved.
Everything that decides the next step (weights, AdamW state, scheduler, the sampler's numpy RNG, torch's
RNG) is in each checkpoint, so on CPU a resumed run is bit-identical to an uninterrupted one.
Outputs: RUN/config.yaml, RUN/metrics.csv, RUN/tb/ (TensorBoard), RUN/checkpoints/, RUN/summary.json.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import time
import types
import warnings
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from .. import io as rio
from ..data.tokens import TokenData, WindowSampler, val_batches
from ..errors import CheckpointError, RevLLMError
from ..memory import SavedBytes, configure_allocator, cpu_seconds, peak_rss_bytes
from ..modeling import RevLLMConfig, RevLLMForCausalLM
from ..parallel import ddp_static_graph, gradient_sync, parallelize
from ..parallel.full_state import full_model_copy, full_optimizer_state, load_full_optimizer_state
from . import checkpoint as ckpt_io
from .config import ARCH_KEYS, RESUME_MUTABLE, build_config
from .optim import build_optimizer, build_scheduler

CSV_FIELDS = ["step", "tokens", "lr", "train_loss", "val_loss", "tokens_per_s", "mem_mb", "elapsed_s"]


def causal_lm_loss(model, batch):
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids).loss, {}


def memory_mb(device) -> float:
    """CUDA: max allocated; CPU: the process's peak RSS (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


def _resolve_resume(cfg, explicit):
    ckpt = rio.latest_good(cfg.out)
    if ckpt is None:
        raise RevLLMError(f"--resume: no good checkpoint in {cfg.out}/checkpoints")
    meta, opt_state, rng = ckpt_io.load_trainer_state(ckpt)
    stored = meta["config"]
    for k in explicit or ():
        if k not in RESUME_MUTABLE and getattr(cfg, k) != stored.get(k):
            raise RevLLMError(f"--resume: {k} cannot change ({stored.get(k)!r} in the checkpoint, {getattr(cfg, k)!r} given)")
    keep = {k: getattr(cfg, k) for k in RESUME_MUTABLE if k in (explicit or ()) or k in ("out", "resume", "progress")}
    keep.setdefault("data", stored.get("data"))
    new = build_config(base=stored, overrides=keep)
    # stop_after / max_time limit one invocation: never inherited from the run that stopped (None included).
    new.stop_after, new.max_time = cfg.stop_after, cfg.max_time
    # The lr schedule is the one the run was planned with (runs saved before schedule_steps: their max_steps);
    # re-planning it for a new --max-steps would make the lr jump at the resumed step.
    new.schedule_steps = stored.get("schedule_steps") or stored["max_steps"]
    return new.validate(), ckpt, meta, opt_state, rng


def _keep_global_batch(cfg, meta, world: int) -> None:
    """A resume on another number of processes keeps the run's global batch (rows per optimizer step) by
    changing grad_accum, and says so; refused when the new world size does not divide it."""
    was = meta.get("world_size")
    if was is None:  # checkpoints written before world_size was recorded: tokens = steps x global batch
        was = meta["tokens"] // max(1, meta["step"] * cfg.batch_size * cfg.seq_len * cfg.grad_accum) or 1
    if was == world:
        return
    micro = was * cfg.grad_accum  # per-process micro-batches of batch_size rows in one step
    if micro % world:
        raise RevLLMError(f"--resume: the run was trained on {was} process(es) with grad_accum={cfg.grad_accum} "
                          f"({micro * cfg.batch_size} rows per step) and this launch has {world}; relaunch on a number "
                          f"of processes that divides {micro} to keep the global batch")
    rio.say(f"resuming on {world} process(es) instead of {was}: grad_accum {cfg.grad_accum} -> {micro // world} "
                f"keeps the global batch of {micro * cfg.batch_size} rows per step")
    cfg.grad_accum = micro // world


def _make_run_dir(run: Path) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise RevLLMError(f"cannot write the run directory {run} ({e.strerror or e}): choose a writable --out") from None


def _val_windows(tokens, cfg, world: int) -> torch.Tensor:
    """All validation windows, the same on every rank and for every world size: eval_iters x the global
    batch of one optimizer step (evenly spaced over val.bin, fewer if val.bin is short)."""
    n = cfg.eval_iters * cfg.batch_size * world * cfg.grad_accum
    return next(val_batches(tokens, n, cfg.seq_len, 1))


class _SavedActivations(SavedBytes):
    """SavedBytes with FSDP2's gathered weights excluded as well: under FSDP2 a layer's parameters are the
    all-gathered copies while it runs (the root's are kept until the backward), which the base class,
    excluding only the shards it saw at construction, would count as activations. The storages of the
    model's parameters *at pack time* are excluded, so DDP and FSDP2 count the same thing: activations."""

    def __init__(self, model):
        super().__init__(model)
        self.model = model

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if any(getattr(p, "_local_tensor", p).untyped_storage().data_ptr() == ptr for p in self.model.parameters()):
            return t
        return super()._pack(t)


@contextlib.contextmanager
def _warnings_through_bar():
    """Warnings as plain lines written through tqdm while the bar is on (not glued to its line)."""
    old = warnings.showwarning
    warnings.showwarning = lambda msg, cat, *a, **k: rio.say(f"warning: {msg}")
    try:
        yield
    finally:
        warnings.showwarning = old


def _describe_model(cfg, model) -> None:
    """The run's record (config.yaml, summary, checkpoints) names the model actually trained: a model
    from init_from or from the caller brings its own architecture and dynamics."""
    c = getattr(model, "config", None)
    if getattr(c, "model_type", None) != "revllm":
        cfg.dynamics = "euler"  # an ordinary HF model: the standard residual network
        return
    for key, attr in (("block", "block"), ("dynamics", "dynamics"), ("layers", "num_hidden_layers"),
                      ("hidden", "hidden_size"), ("heads", "num_attention_heads"), ("kv_heads", "num_key_value_heads")):
        if getattr(c, attr, None) is not None:
            setattr(cfg, key, getattr(c, attr))


def _new_model(cfg, data, seed):
    torch.manual_seed(seed)
    sep = data.meta["tokenizer"].get("separator_id")
    return RevLLMForCausalLM(RevLLMConfig(**cfg.model_kwargs(data.vocab_size, sep)))


def _tokenizer_sha(tokenizer):
    if tokenizer is None:
        return None
    return rio.tokenizer_identity(tokenizer, "model")["sha256"]


def train(cfg, model=None, loss_fn=None, teacher=None, explicit=None) -> dict:
    configure_allocator()  # keeps the process's peak flat in depth on glibc (revllm/memory.py says why)
    cfg = cfg.validate()
    if cfg.init_from and not cfg.resume and set(explicit or ()) & ARCH_KEYS:
        clash = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(set(explicit) & ARCH_KEYS))
        raise RevLLMError(f"--init-from brings its own model (architecture and dynamics): drop {clash}")
    resume = None
    if cfg.resume:
        cfg, ckpt, meta, opt_state, rng = _resolve_resume(cfg, explicit)
        resume = (ckpt, meta, opt_state, rng)
    run = Path(cfg.out)
    if not resume and rio.list_checkpoints(run):
        raise RevLLMError(f"{run} already holds checkpoints: pass --resume to continue it, or choose another --out")
    if cfg.schedule_steps is None:
        cfg.schedule_steps = cfg.max_steps
    data = TokenData(cfg.data)
    if resume:
        was = resume[1].get("data_tokenizer", {})
        if was.get("sha256") != data.meta["tokenizer"].get("sha256") or was.get("vocab_size") != data.vocab_size:
            raise RevLLMError(f"--resume: {data.dir} was made with tokenizer {data.meta['tokenizer']['name']!r}, "
                              f"but the run was trained on {was.get('name')!r}; use token files from the same tokenizer")
    tokenizer = rio.load_tokenizer(data.dir / "tokenizer") if (data.dir / "tokenizer").is_dir() else None

    # -- the model -------------------------------------------------------------------------------
    if model is None and resume:
        model = rio.load_model(resume[0])
    elif model is None and cfg.init_from:
        model = rio.load_model(cfg.init_from)
        src_dir = rio.resolve_model_dir(cfg.init_from)
        if (src_dir / "tokenizer.json").is_file():
            data.check(cfg.seq_len, model.config.vocab_size, _tokenizer_sha(rio.load_tokenizer(src_dir)))
    elif model is None:
        model = _new_model(cfg, data, cfg.seed)
    _describe_model(cfg, model)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise RevLLMError(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={max_pos}")
    data.check(cfg.seq_len, model.config.vocab_size)
    if resume and cfg.max_steps > cfg.schedule_steps:  # said once the inputs are known to be good
        rio.say(f"--max-steps {cfg.max_steps} extends the run past the {cfg.schedule_steps} steps its lr schedule "
                    f"planned: the schedule is kept, steps {cfg.schedule_steps + 1}-{cfg.max_steps} run at its final lr "
                    f"{cfg.min_lr:g} (min_lr)")
    if cfg.activation_checkpointing:
        if getattr(model.config, "memory_free", False):
            raise RevLLMError("activation_checkpointing applies to the stored path; memory_free stores no activations")
        model.activation_checkpointing_enable()
    loss_fn = loss_fn or causal_lm_loss

    # -- accelerator, optimizer, schedule ----------------------------------------------------------
    cuda = torch.cuda.is_available()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and not cuda:
        raise RevLLMError(f"precision={precision} needs a GPU; use fp32 (or auto) on CPU")
    acc = Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=not cuda,
                      kwargs_handlers=[DistributedDataParallelKwargs(static_graph=ddp_static_graph(model))])
    world, rank = acc.num_processes, acc.process_index
    main = acc.is_main_process
    _make_run_dir(run)
    if main:
        for name in ckpt_io.remove_stale_temps(run):
            rio.say(f"removed {run / 'checkpoints' / name}, left by a save that did not finish")
    acc.wait_for_everyone()
    if resume:
        _keep_global_batch(cfg, resume[1], world)
    fsdp2 = cfg.parallel == "fsdp2" and world > 1
    if cfg.parallel == "fsdp2" and not fsdp2:
        warnings.warn("parallel=fsdp2 is ignored in a single process (launch with torchrun --nproc-per-node N)")
    if fsdp2:
        # Shard before building the optimizer (it must hold the sharded parameters); prepare(model) is
        # skipped because accelerate would wrap the sharded model in DDP as well.
        model = parallelize(model.to(acc.device), "fsdp2")
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, dataclasses.replace(cfg, max_steps=cfg.schedule_steps))
        optimizer = acc.prepare(optimizer)
    else:
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, dataclasses.replace(cfg, max_steps=cfg.schedule_steps))
        model, optimizer = acc.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(acc.device).eval().requires_grad_(False)
    # The whole step's global batch in one draw: micro-batch m of rank r is rows (m * world + r) * batch_size...,
    # so the rows of a step do not depend on how they are split over processes and micro-batches.
    sampler = WindowSampler(data.train, cfg.batch_size * world * cfg.grad_accum, cfg.seq_len, cfg.seed)
    step, tokens, train_time, timed_tokens = 0, 0, 0.0, 0
    if resume:
        ckpt, meta, opt_state, rng = resume
        if fsdp2:
            load_full_optimizer_state(model, optimizer.optimizer, opt_state)
        else:
            optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(meta["scheduler"])
        sampler.load_state(meta["sampler"])
        torch.set_rng_state(rng["torch"])
        if cuda and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        step, tokens = meta["step"], meta["tokens"]
        train_time, timed_tokens = meta.get("train_time", 0.0), meta.get("timed_tokens", 0)
    else:
        torch.manual_seed(cfg.seed)

    # -- logs ---------------------------------------------------------------------------------------
    csv_path = run / "metrics.csv"
    # a loss_fn may name its own metrics (distillation: kl, ce, ...): they get columns and TensorBoard tags
    fields = CSV_FIELDS + [k for k in getattr(loss_fn, "metric_names", ()) if k not in CSV_FIELDS]
    if main:
        tmp = run / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, run / "config.yaml")
        rows = []
        if resume and csv_path.is_file():  # rows written after the checkpoint belong to the lost future
            with open(csv_path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        tb = SummaryWriter(str(run / "tb"), purge_step=step if resume else None)
    n_params = sum(p.numel() for p in acc.unwrap_model(model).parameters())
    meter, act_bytes = (_SavedActivations(model) if fsdp2 else SavedBytes(model)), None
    windows = _val_windows(data.val, cfg, world)

    def evaluate():
        """Mean loss over all windows: each rank scores windows rank, rank + world, ... in batches of
        batch_size; every rank runs the same number of forwards (DDP/FSDP2 forwards are collective), a
        rank short of windows scores a padding batch with weight 0."""
        model.eval()
        mine = windows[rank::world]
        per_rank = -(-len(windows) // world)
        total = torch.zeros(2, device=acc.device, dtype=torch.float64)  # sum of window losses, windows
        with torch.no_grad(), acc.autocast():
            for i in range(0, per_rank, cfg.batch_size):
                x = mine[i:i + cfg.batch_size]
                weight = len(x)
                x = x if weight else windows[:1]
                loss = loss_fn(model, {"input_ids": x.to(acc.device)})[0].double()
                total += torch.stack([loss * weight, torch.tensor(float(weight), device=acc.device, dtype=torch.float64)])
        if world > 1:
            total = acc.reduce(total, "sum")
        model.train()
        return (total[0] / total[1]).item()

    def check_finite():
        """Before a save: parameters and optimizer state must all be finite (a finite loss does not show that
        the update it was followed by did not overflow). One fused reduction, one sync."""
        bad = rio.nonfinite(list(model.parameters()))
        bad += rio.nonfinite(ckpt_io.optimizer_tensors(getattr(optimizer, "optimizer", optimizer)))
        if world > 1:
            bad = int(acc.reduce(torch.tensor(float(bad), device=acc.device), "sum").item())
        if bad:
            good = rio.latest_good(run, action="the last good one is")
            raise RevLLMError(f"parameters/optimizer state became NaN/inf at step {step} ({bad} tensors; the lr may be too "
                              f"high): training stopped, nothing saved; last good checkpoint: {good or 'none'}")

    def save():
        check_finite()
        st = {"world_size": world, "tokens": tokens, "train_time": train_time, "timed_tokens": timed_tokens, "sampler": sampler.state(), "config": cfg.to_dict(),
              "data_tokenizer": data.meta["tokenizer"]}
        rngs = {"torch": torch.get_rng_state()}
        if cuda:
            rngs["cuda"] = torch.cuda.get_rng_state()
        to_save, opt = acc.unwrap_model(model), optimizer
        if fsdp2:  # collective gathers, on every rank
            to_save, opt_sd = full_model_copy(model), full_optimizer_state(model, optimizer.optimizer)
            opt = types.SimpleNamespace(state_dict=lambda: opt_sd)
        err = None
        if main:
            try:
                ckpt_io.save_checkpoint(run, step, to_save, tokenizer, opt, scheduler, st, rngs, cfg.keep_last)
            except CheckpointError as e:
                err = e
        if world > 1:  # every rank stops when rank 0 could not save (a lone raise would leave the others waiting)
            failed = acc.reduce(torch.tensor(float(err is not None), device=acc.device), "sum").item()
            if failed and err is None:
                raise RevLLMError(f"rank 0 could not save checkpoint step {step}; training stopped")
        if err is not None:
            raise err
        acc.wait_for_everyone()

    def log(row):
        if not main:
            return
        with open(csv_path, "a", newline="") as f:
            csv.DictWriter(f, fields, extrasaction="ignore").writerow(row)
        for k in ("train_loss", "val_loss", "lr", "tokens_per_s", "mem_mb", *fields[len(CSV_FIELDS):]):
            if row.get(k) not in (None, ""):
                tb.add_scalar(k, row[k], row["step"])

    # -- the loop -------------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=min(cfg.max_steps, cfg.stop_after or cfg.max_steps), initial=step, desc=f"train {cfg.dynamics}", disable=not (cfg.progress and main),
               dynamic_ncols=True)
    t_start, win_tokens, win_time, val_loss, extra = time.perf_counter(), 0, 0.0, None, {}
    first_step_time, stopped = None, None
    # The bar is closed (and warnings are written through it) even when the loop stops with an error,
    # so the error line is not glued to the bar's.
    with bar, _warnings_through_bar():
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=acc.device)
            for micro in range(cfg.grad_accum):
                if micro == 0:
                    rows = sampler.next()  # the step's global batch
                first = (micro * world + rank) * cfg.batch_size
                batch = {"input_ids": rows[first:first + cfg.batch_size].to(acc.device)}
                sync = gradient_sync(model, micro == cfg.grad_accum - 1)  # DDP no_sync / FSDP2 no reduce-scatter
                measure = meter if act_bytes is None else contextlib.nullcontext()
                with sync:
                    with measure:
                        loss, extra = loss_fn(model, batch)
                    acc.backward(loss / cfg.grad_accum)
                if act_bytes is None:
                    act_bytes = meter.bytes
                loss_sum += loss.detach().float()
            if world > 1:
                loss_sum = acc.reduce(loss_sum, "mean")  # log the global batch's loss, not rank 0's rows
            train_loss = (loss_sum / cfg.grad_accum).item()
            if not math.isfinite(train_loss):
                good = rio.latest_good(run, action="the last good one is")
                raise RevLLMError(f"loss is {train_loss} at step {step + 1}: training stopped, nothing saved; "
                                  f"last good checkpoint: {good or 'none'}")
            if cfg.clip > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_tok = cfg.batch_size * cfg.seq_len * cfg.grad_accum * acc.num_processes
            tokens += n_tok
            dt = time.perf_counter() - t0
            if first_step_time is None:
                first_step_time = dt  # includes one-time costs; left out of the throughput
            else:
                train_time, timed_tokens = train_time + dt, timed_tokens + n_tok
                win_tokens, win_time = win_tokens + n_tok, win_time + dt
            mem = memory_mb(acc.device)
            tps = win_tokens / win_time if win_time else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", mem=f"{mem:,.0f}MB")
            val_loss = evaluate() if step % cfg.eval_interval == 0 or step == cfg.max_steps else None
            if step % cfg.log_interval == 0 or val_loss is not None or step == cfg.max_steps:
                row = {"step": step, "tokens": tokens, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
                       "val_loss": "" if val_loss is None else val_loss, "tokens_per_s": round(tps, 1),
                       "mem_mb": round(mem, 1), "elapsed_s": round(time.perf_counter() - t_start, 2)}
                row.update({k: v for k, v in extra.items() if k in fields})
                log(row)
                win_tokens, win_time = 0, 0.0
            if cfg.max_time and time.perf_counter() - t_start > cfg.max_time and step < cfg.max_steps:
                stopped = f"max_time={cfg.max_time}s reached at step {step}"
            if cfg.stop_after and step >= cfg.stop_after and step < cfg.max_steps:
                stopped = f"stop_after={cfg.stop_after}"
            if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or stopped:
                save()
            if stopped:
                break
    if val_loss is None:
        val_loss = evaluate()
    summary = {"run": str(run), "steps": step, "tokens": tokens, "val_loss": val_loss,
               "val_ppl": math.exp(min(val_loss, 50)), "tokens_per_s": timed_tokens / train_time if train_time else 0.0,
               "activation_mb": (act_bytes or 0) / 2**20, "peak_mb": memory_mb(acc.device),
               "peak_kind": "cuda_max_allocated" if cuda else "cpu_max_rss", "params": n_params,
               "dynamics": cfg.dynamics, "block": cfg.block, "memory_free": bool(getattr(acc.unwrap_model(model).config,
                                                                                           "memory_free", False)),
               "precision": precision, "device": str(acc.device), "stopped_early": stopped,
               "wall_s": time.perf_counter() - t_start, "cpu_s": cpu_seconds(), "config": cfg.to_dict(),
               "world_size": world, "rank": rank}
    if main:
        tb.close()
        tmp = run / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, run / "summary.json")
    # Every rank leaves together, its collectives done (the launcher's caller destroys the process group:
    # revllm.cli does; a library caller may still need the group, e.g. to gather a model after training).
    acc.wait_for_everyone()
    return summary

