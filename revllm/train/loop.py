"""The training loop: ``train`` runs a few named steps, each readable in one sitting.

Reusable entry point::

    train(cfg, model=None, loss_fn=None, teacher=None, explicit=None) -> summary dict

Its steps: ``_plan`` (the config; a resume's comes from its checkpoint), ``_open_data``, ``_choose_model``,
``_setup`` (accelerator, run directory, parallel wrapping, optimizer, schedule, sampler), ``_restore`` (the
resumed state), ``_open_logs``, then ``_loop`` (``_one_step``, ``_evaluate``, ``_log``, ``_save``) and
``_finish`` (the summary). They hand each other one ``_Run``.

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

from ..data.tokens import TokenData, WindowSampler, val_batches
from ..errors import CheckpointError, RevLLMError
from ..io import (
    atomic_write,
    latest_good,
    list_checkpoints,
    load_model,
    load_tokenizer,
    nonfinite,
    resolve_model_dir,
    say,
    tokenizer_identity,
)
from ..memory import SavedBytes, configure_allocator, cpu_seconds, peak_rss_bytes
from ..modeling import RevLLMConfig, RevLLMForCausalLM
from ..parallel import ddp_static_graph, gradient_sync, parallelize
from ..parallel.full_state import full_model_copy, full_optimizer_state, load_full_optimizer_state
from ..parallel.wrap import base_model
from . import checkpoint as ckpt_io
from .config import ARCH_KEYS, RESUME_MUTABLE, TrainConfig, build_config
from .optim import build_optimizer, build_scheduler

CSV_FIELDS = ["step", "tokens", "lr", "train_loss", "val_loss", "tokens_per_s", "mem_mb", "elapsed_s"]


def causal_lm_loss(model, batch):
    ids = batch["input_ids"]
    # Only the loss is used. A RevLLM model asked for one logit position builds no (B, T, V) logits in
    # evaluation either (16 x 512 tokens x 49,152 in fp32 is 1.6 GB: it was the whole run's peak). HF models
    # compute their loss from those logits, so they get the call unchanged.
    keep = {"logits_to_keep": 1} if isinstance(base_model(model), RevLLMForCausalLM) else {}
    return model(input_ids=ids, labels=ids, **keep).loss, {}


def memory_mb(device) -> float:
    """CUDA: max allocated; CPU: the process's peak RSS (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


def _resolve_resume(cfg, explicit):
    ckpt = latest_good(cfg.out)
    if ckpt is None:
        raise RevLLMError(f"--resume: no good checkpoint in {cfg.out}/checkpoints")
    meta, opt_state, rng = ckpt_io.load_trainer_state(ckpt)
    stored = meta["config"]
    for k in explicit or ():
        if k not in RESUME_MUTABLE and getattr(cfg, k) != stored.get(k):
            raise RevLLMError(
                f"--resume: {k} cannot change ({stored.get(k)!r} in the checkpoint, {getattr(cfg, k)!r} given)"
            )
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
        raise RevLLMError(
            f"--resume: the run was trained on {was} process(es) with grad_accum={cfg.grad_accum} "
            f"({micro * cfg.batch_size} rows per step) and this launch has {world}; relaunch on a number "
            f"of processes that divides {micro} to keep the global batch"
        )
    say(
        f"resuming on {world} process(es) instead of {was}: grad_accum {cfg.grad_accum} -> {micro // world} "
        f"keeps the global batch of {micro * cfg.batch_size} rows per step"
    )
    cfg.grad_accum = micro // world


def _make_run_dir(run: Path) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise RevLLMError(
            f"cannot write the run directory {run} ({e.strerror or e}): choose a writable --out"
        ) from None


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
    warnings.showwarning = lambda msg, cat, *a, **k: say(f"warning: {msg}")
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
    for key, attr in (
        ("block", "block"),
        ("dynamics", "dynamics"),
        ("layers", "num_hidden_layers"),
        ("hidden", "hidden_size"),
        ("heads", "num_attention_heads"),
        ("kv_heads", "num_key_value_heads"),
    ):
        if getattr(c, attr, None) is not None:
            setattr(cfg, key, getattr(c, attr))


def _new_model(cfg, data, seed):
    torch.manual_seed(seed)
    sep = data.meta["tokenizer"].get("separator_id")
    return RevLLMForCausalLM(RevLLMConfig(**cfg.model_kwargs(data.vocab_size, sep)))


@dataclasses.dataclass
class _Run:
    """One invocation of ``train``: what its named steps hand each other."""

    cfg: TrainConfig
    data: TokenData
    tokenizer: object
    model: object
    loss_fn: object
    resume: tuple | None  # (checkpoint dir, trainer_state.json, optimizer state, rng states)
    acc: Accelerator | None = None
    precision: str = "fp32"
    world: int = 1
    rank: int = 0
    main: bool = True
    fsdp2: bool = False
    optimizer: object = None
    scheduler: object = None
    sampler: WindowSampler | None = None
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0  # seconds of timed steps (every step after an invocation's first)
    timed_tokens: int = 0
    fields: list = dataclasses.field(default_factory=list)
    tb: SummaryWriter | None = None
    meter: SavedBytes | None = None
    act_bytes: int | None = None  # bytes saved for backward by the first micro-batch
    windows: torch.Tensor | None = None

    @property
    def run(self) -> Path:
        return Path(self.cfg.out)

    @property
    def cuda(self) -> bool:
        return torch.cuda.is_available()


def train(cfg, model=None, loss_fn=None, teacher=None, explicit=None) -> dict:
    """Train (see the module docstring); returns the summary also written to RUN/summary.json."""
    configure_allocator()  # keeps the process's peak flat in depth on glibc (revllm/memory.py says why)
    cfg, resume = _plan(cfg, explicit)
    data, tokenizer = _open_data(cfg, resume)
    r = _Run(cfg, data, tokenizer, _choose_model(cfg, data, model, resume), loss_fn or causal_lm_loss, resume)
    _setup(r, teacher)
    _restore(r)
    _open_logs(r)
    val_loss, stopped, t_start = _loop(r)
    return _finish(r, val_loss, stopped, t_start)


# -- setup ------------------------------------------------------------------------------------------
def _plan(cfg, explicit) -> tuple:
    """The run's config (a resume's comes from its checkpoint) and what to resume from (None: a new run)."""
    cfg = cfg.validate()
    if cfg.init_from and not cfg.resume and set(explicit or ()) & ARCH_KEYS:
        clash = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(set(explicit) & ARCH_KEYS))
        raise RevLLMError(f"--init-from brings its own model (architecture and dynamics): drop {clash}")
    resume = None
    if cfg.resume:
        cfg, ckpt, meta, opt_state, rng = _resolve_resume(cfg, explicit)
        resume = (ckpt, meta, opt_state, rng)
    run = Path(cfg.out)
    if not resume and list_checkpoints(run):
        raise RevLLMError(f"{run} already holds checkpoints: pass --resume to continue it, or choose another --out")
    if cfg.schedule_steps is None:
        cfg.schedule_steps = cfg.max_steps
    return cfg, resume


def _open_data(cfg, resume) -> tuple:
    """The token files (a resume needs the same tokenizer's) and the tokenizer saved with them, if any."""
    data = TokenData(cfg.data)
    if resume:
        was = resume[1].get("data_tokenizer", {})
        if was.get("sha256") != data.meta["tokenizer"].get("sha256") or was.get("vocab_size") != data.vocab_size:
            raise RevLLMError(
                f"--resume: {data.dir} was made with tokenizer {data.meta['tokenizer']['name']!r}, "
                f"but the run was trained on {was.get('name')!r}; use token files from the same tokenizer"
            )
    tokenizer = load_tokenizer(data.dir / "tokenizer") if (data.dir / "tokenizer").is_dir() else None
    return data, tokenizer


def _choose_model(cfg, data, model, resume):
    """The caller's model, else the checkpoint's (resume), the init_from one, or a new one; checked against
    the data and the config."""
    if model is None and resume:
        model = load_model(resume[0])
    elif model is None and cfg.init_from:
        model = load_model(cfg.init_from)
        src_dir = resolve_model_dir(cfg.init_from)
        if (src_dir / "tokenizer.json").is_file():
            data.check(cfg.seq_len, model.config.vocab_size, tokenizer_identity(load_tokenizer(src_dir), str(src_dir)))
    elif model is None:
        model = _new_model(cfg, data, cfg.seed)
    _describe_model(cfg, model)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise RevLLMError(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={max_pos}")
    data.check(cfg.seq_len, model.config.vocab_size)
    if resume and cfg.max_steps > cfg.schedule_steps:  # said once the inputs are known to be good
        say(
            f"--max-steps {cfg.max_steps} extends the run past the {cfg.schedule_steps} steps its lr schedule "
            f"planned: the schedule is kept, steps {cfg.schedule_steps + 1}-{cfg.max_steps} run at its final lr "
            f"{cfg.min_lr:g} (min_lr)"
        )
    if cfg.activation_checkpointing:
        if getattr(model.config, "memory_free", False):
            raise RevLLMError("activation_checkpointing applies to the stored path; memory_free stores no activations")
        model.activation_checkpointing_enable()
    return model


def _accelerator(r: _Run) -> None:
    """Precision (bf16 autocast on a bf16 GPU, fp32 on CPU) and the accelerate.Accelerator of the run."""
    precision = r.cfg.precision
    if precision == "auto":
        precision = "bf16" if r.cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and not r.cuda:
        raise RevLLMError(f"precision={precision} needs a GPU; use fp32 (or auto) on CPU")
    r.precision = precision
    r.acc = Accelerator(
        mixed_precision="no" if precision == "fp32" else precision,
        cpu=not r.cuda,
        kwargs_handlers=[DistributedDataParallelKwargs(static_graph=ddp_static_graph(r.model))],
    )
    r.world, r.rank, r.main = r.acc.num_processes, r.acc.process_index, r.acc.is_main_process


def _setup(r: _Run, teacher) -> None:
    """Accelerator, run directory, data-parallel wrapping, optimizer, lr schedule and batch sampler."""
    cfg = r.cfg
    _accelerator(r)
    _make_run_dir(r.run)
    if r.main:
        for name in ckpt_io.remove_stale_temps(r.run):
            say(f"removed {r.run / 'checkpoints' / name}, left by a save that did not finish")
    r.acc.wait_for_everyone()
    if r.resume:
        _keep_global_batch(cfg, r.resume[1], r.world)
    r.fsdp2 = cfg.parallel == "fsdp2" and r.world > 1
    if cfg.parallel == "fsdp2" and not r.fsdp2:
        warnings.warn("parallel=fsdp2 is ignored in a single process (launch with torchrun --nproc-per-node N)")
    if r.fsdp2:
        # Shard before building the optimizer (it must hold the sharded parameters); prepare(model) is
        # skipped because accelerate would wrap the sharded model in DDP as well.
        r.model = parallelize(r.model.to(r.acc.device), "fsdp2")
        r.optimizer = build_optimizer(r.model, cfg)
        r.scheduler = build_scheduler(r.optimizer, dataclasses.replace(cfg, max_steps=cfg.schedule_steps))
        r.optimizer = r.acc.prepare(r.optimizer)
    else:
        r.optimizer = build_optimizer(r.model, cfg)
        r.scheduler = build_scheduler(r.optimizer, dataclasses.replace(cfg, max_steps=cfg.schedule_steps))
        r.model, r.optimizer = r.acc.prepare(r.model, r.optimizer)
    if teacher is not None:
        teacher.to(r.acc.device).eval().requires_grad_(False)
    # The whole step's global batch in one draw: micro-batch m of rank r is rows (m * world + r) * batch_size...,
    # so the rows of a step do not depend on how they are split over processes and micro-batches.
    r.sampler = WindowSampler(r.data.train, cfg.batch_size * r.world * cfg.grad_accum, cfg.seq_len, cfg.seed)


# -- resume -----------------------------------------------------------------------------------------
def _restore(r: _Run) -> None:
    """A resume restores everything that decides the next step (optimizer, schedule, sampler, RNG,
    counters); a new run seeds torch's RNG."""
    if not r.resume:
        torch.manual_seed(r.cfg.seed)
        return
    _, meta, opt_state, rng = r.resume
    if r.fsdp2:
        load_full_optimizer_state(r.model, r.optimizer.optimizer, opt_state)
    else:
        r.optimizer.load_state_dict(opt_state)
    r.scheduler.load_state_dict(meta["scheduler"])
    r.sampler.load_state(meta["sampler"])
    torch.set_rng_state(rng["torch"])
    if r.cuda and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    r.step, r.tokens = meta["step"], meta["tokens"]
    r.train_time, r.timed_tokens = meta.get("train_time", 0.0), meta.get("timed_tokens", 0)


def _open_logs(r: _Run) -> None:
    """RUN/config.yaml, metrics.csv (a resume keeps the rows up to its step) and TensorBoard; the
    activation meter and the validation windows."""
    # a loss_fn may name its own metrics (distillation: kl, ce, ...): they get columns and TensorBoard tags
    r.fields = CSV_FIELDS + [k for k in getattr(r.loss_fn, "metric_names", ()) if k not in CSV_FIELDS]
    if r.main:
        atomic_write(r.run / "config.yaml", yaml.safe_dump(r.cfg.to_dict(), sort_keys=False))
        csv_path, rows = r.run / "metrics.csv", []
        if r.resume and csv_path.is_file():  # rows written after the checkpoint belong to the lost future
            with open(csv_path) as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= r.step]
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, r.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        r.tb = SummaryWriter(str(r.run / "tb"), purge_step=r.step if r.resume else None)
    r.meter = _SavedActivations(r.model) if r.fsdp2 else SavedBytes(r.model)
    r.windows = _val_windows(r.data.val, r.cfg, r.world)


# -- one step ---------------------------------------------------------------------------------------
def _one_step(r: _Run) -> tuple:
    """One optimizer step on the step's global batch (this rank's rows of each of grad_accum micro-batches).
    Returns (train loss of the global batch, the loss_fn's metrics, seconds, tokens)."""
    cfg, acc = r.cfg, r.acc
    t0 = time.perf_counter()
    loss_sum, extra = torch.zeros((), device=acc.device), {}
    rows = r.sampler.next()  # the step's global batch
    for micro in range(cfg.grad_accum):
        first = (micro * r.world + r.rank) * cfg.batch_size
        batch = {"input_ids": rows[first : first + cfg.batch_size].to(acc.device)}
        sync = gradient_sync(r.model, micro == cfg.grad_accum - 1)  # DDP no_sync / FSDP2 no reduce-scatter
        measure = r.meter if r.act_bytes is None else contextlib.nullcontext()
        with sync:
            with measure:
                loss, extra = r.loss_fn(r.model, batch)
            acc.backward(loss / cfg.grad_accum)
        if r.act_bytes is None:
            r.act_bytes = r.meter.bytes
        loss_sum += loss.detach().float()
    if r.world > 1:
        loss_sum = acc.reduce(loss_sum, "mean")  # log the global batch's loss, not rank 0's rows
    train_loss = (loss_sum / cfg.grad_accum).item()
    if not math.isfinite(train_loss):
        good = latest_good(r.run, action="the last good one is")
        raise RevLLMError(
            f"loss is {train_loss} at step {r.step + 1}: training stopped, nothing saved; "
            f"last good checkpoint: {good or 'none'}"
        )
    if cfg.clip > 0:
        acc.clip_grad_norm_(r.model.parameters(), cfg.clip)
    r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.step += 1
    n_tok = cfg.batch_size * cfg.seq_len * cfg.grad_accum * acc.num_processes
    r.tokens += n_tok
    return train_loss, extra, time.perf_counter() - t0, n_tok


def _loop(r: _Run) -> tuple:
    """Steps until max_steps or a stop (max_time, stop_after), evaluating, logging and checkpointing on
    their intervals. Returns (last validation loss or None, why it stopped early or None, start time)."""
    cfg = r.cfg
    r.model.train()
    bar = tqdm(
        total=min(cfg.max_steps, cfg.stop_after or cfg.max_steps),
        initial=r.step,
        desc=f"train {cfg.dynamics}",
        disable=not (cfg.progress and r.main),
        dynamic_ncols=True,
    )
    t_start, win_tokens, win_time, val_loss = time.perf_counter(), 0, 0.0, None
    first_step_done, stopped = False, None
    # The bar is closed (and warnings are written through it) even when the loop stops with an error,
    # so the error line is not glued to the bar's.
    with bar, _warnings_through_bar():
        while r.step < cfg.max_steps:
            train_loss, extra, dt, n_tok = _one_step(r)
            if first_step_done:  # the first step includes one-time costs; left out of the throughput
                r.train_time, r.timed_tokens = r.train_time + dt, r.timed_tokens + n_tok
                win_tokens, win_time = win_tokens + n_tok, win_time + dt
            first_step_done = True
            mem = memory_mb(r.acc.device)
            tps = win_tokens / win_time if win_time else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", mem=f"{mem:,.0f}MB")
            val_loss = _evaluate(r) if r.step % cfg.eval_interval == 0 or r.step == cfg.max_steps else None
            if r.step % cfg.log_interval == 0 or val_loss is not None or r.step == cfg.max_steps:
                row = {
                    "step": r.step,
                    "tokens": r.tokens,
                    "lr": r.scheduler.get_last_lr()[0],
                    "train_loss": train_loss,
                    "val_loss": "" if val_loss is None else val_loss,
                    "tokens_per_s": round(tps, 1),
                    "mem_mb": round(mem, 1),
                    "elapsed_s": round(time.perf_counter() - t_start, 2),
                }
                _log(r, {**row, **{k: v for k, v in extra.items() if k in r.fields}})
                win_tokens, win_time = 0, 0.0
            stopped = _stop_reason(cfg, r.step, time.perf_counter() - t_start)
            if r.step % cfg.checkpoint_interval == 0 or r.step == cfg.max_steps or stopped:
                _save(r)
            if stopped:
                break
    return val_loss, stopped, t_start


def _stop_reason(cfg, step: int, elapsed: float) -> str | None:
    """Why this invocation stops before max_steps (it checkpoints first), or None."""
    stopped = None
    if cfg.max_time and elapsed > cfg.max_time and step < cfg.max_steps:
        stopped = f"max_time={cfg.max_time}s reached at step {step}"
    if cfg.stop_after and step >= cfg.stop_after and step < cfg.max_steps:
        stopped = f"stop_after={cfg.stop_after}"
    return stopped


def _log(r: _Run, row: dict) -> None:
    if not r.main:
        return
    with open(r.run / "metrics.csv", "a", newline="") as f:
        csv.DictWriter(f, r.fields, extrasaction="ignore").writerow(row)
    for k in ("train_loss", "val_loss", "lr", "tokens_per_s", "mem_mb", *r.fields[len(CSV_FIELDS) :]):
        if row.get(k) not in (None, ""):
            r.tb.add_scalar(k, row[k], row["step"])


# -- evaluate ---------------------------------------------------------------------------------------
def _evaluate(r: _Run) -> float:
    """Mean loss over all windows: each rank scores windows rank, rank + world, ... in batches of
    batch_size; every rank runs the same number of forwards (DDP/FSDP2 forwards are collective), a
    rank short of windows scores a padding batch with weight 0."""
    acc, windows, bs = r.acc, r.windows, r.cfg.batch_size
    r.model.eval()
    mine = windows[r.rank :: r.world]
    per_rank = -(-len(windows) // r.world)
    total = torch.zeros(2, device=acc.device, dtype=torch.float64)  # sum of window losses, windows
    with torch.no_grad(), acc.autocast():
        for i in range(0, per_rank, bs):
            x = mine[i : i + bs]
            weight = len(x)
            x = x if weight else windows[:1]
            loss = r.loss_fn(r.model, {"input_ids": x.to(acc.device)})[0].double()
            total += torch.stack([loss * weight, torch.tensor(float(weight), device=acc.device, dtype=torch.float64)])
    if r.world > 1:
        total = acc.reduce(total, "sum")
    r.model.train()
    return (total[0] / total[1]).item()


# -- checkpoint -------------------------------------------------------------------------------------
def _check_finite(r: _Run) -> None:
    """Before a save: parameters and optimizer state must all be finite (a finite loss does not show that
    the update it was followed by did not overflow). One fused reduction, one sync."""
    bad = nonfinite(list(r.model.parameters()))
    bad += nonfinite(ckpt_io.optimizer_tensors(getattr(r.optimizer, "optimizer", r.optimizer)))
    if r.world > 1:
        bad = int(r.acc.reduce(torch.tensor(float(bad), device=r.acc.device), "sum").item())
    if bad:
        good = latest_good(r.run, action="the last good one is")
        raise RevLLMError(
            f"parameters/optimizer state became NaN/inf at step {r.step} ({bad} tensors; the lr may be "
            f"too high): training stopped, nothing saved; last good checkpoint: {good or 'none'}"
        )


def _save(r: _Run) -> None:
    """Checkpoint ``r.step`` (rank 0 writes; under FSDP2 every rank gathers the full state first)."""
    _check_finite(r)
    acc, cfg = r.acc, r.cfg
    st = {
        "world_size": r.world,
        "tokens": r.tokens,
        "train_time": r.train_time,
        "timed_tokens": r.timed_tokens,
        "sampler": r.sampler.state(),
        "config": cfg.to_dict(),
        "data_tokenizer": r.data.meta["tokenizer"],
    }
    rngs = {"torch": torch.get_rng_state()}
    if r.cuda:
        rngs["cuda"] = torch.cuda.get_rng_state()
    to_save, opt = acc.unwrap_model(r.model), r.optimizer
    if r.fsdp2:  # collective gathers, on every rank
        to_save, opt_sd = full_model_copy(r.model), full_optimizer_state(r.model, r.optimizer.optimizer)
        opt = types.SimpleNamespace(state_dict=lambda: opt_sd)
    err = None
    if r.main:
        try:
            ckpt_io.save_checkpoint(r.run, r.step, to_save, r.tokenizer, opt, r.scheduler, st, rngs, cfg.keep_last)
        except CheckpointError as e:
            err = e
    if r.world > 1:  # every rank stops when rank 0 could not save (a lone raise would leave the others waiting)
        failed = acc.reduce(torch.tensor(float(err is not None), device=acc.device), "sum").item()
        if failed and err is None:
            raise RevLLMError(f"rank 0 could not save checkpoint step {r.step}; training stopped")
    if err is not None:
        raise err
    acc.wait_for_everyone()


# -- finish -----------------------------------------------------------------------------------------
def _finish(r: _Run, val_loss, stopped, t_start: float) -> dict:
    """The summary (RUN/summary.json, written by rank 0); every rank leaves together."""
    if val_loss is None:
        val_loss = _evaluate(r)
    model = r.acc.unwrap_model(r.model)
    cfg = r.cfg
    summary = {
        "run": str(r.run),
        "steps": r.step,
        "tokens": r.tokens,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50)),
        "tokens_per_s": r.timed_tokens / r.train_time if r.train_time else 0.0,
        "activation_mb": (r.act_bytes or 0) / 2**20,
        "peak_mb": memory_mb(r.acc.device),
        "peak_kind": "cuda_max_allocated" if r.cuda else "cpu_max_rss",
        "params": sum(p.numel() for p in model.parameters()),
        "dynamics": cfg.dynamics,
        "block": cfg.block,
        "memory_free": bool(getattr(model.config, "memory_free", False)),
        "precision": r.precision,
        "device": str(r.acc.device),
        "stopped_early": stopped,
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": cpu_seconds(),
        "config": cfg.to_dict(),
        "world_size": r.world,
        "rank": r.rank,
    }
    if r.main:
        r.tb.close()
        atomic_write(r.run / "summary.json", json.dumps(summary, indent=1))
    # Every rank leaves together, its collectives done (the launcher's caller destroys the process group:
    # revllm.cli does; a library caller may still need the group, e.g. to gather a model after training).
    r.acc.wait_for_everyone()
    return summary
