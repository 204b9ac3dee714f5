"""Conversion fine-tuning on the project's training loop: distillation (or plain SFT), LoRA, a-annealing.

``finetune(model, data, out, teacher=...)`` hands the model to ``revllm.train.loop.train`` (the same
loop as ``revllm train``: accelerate, atomic verified checkpoints, ``--resume``, metrics.csv,
TensorBoard) with a ``DistillLoss`` as its ``loss_fn``; the validation loss it logs is then the
distillation loss. LoRA adapters (peft) are merged back before the final model is written to
``RUN/model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from ..blocks import family_of
from ..errors import RevLLMError
from ..io import atomic_write, latest_good, list_checkpoints, load_model, save_model_atomic, verify
from ..parallel.full_state import full_model_copy
from ..train.config import build_config
from ..train.loop import train
from .distill import AnnealA, DistillLoss


def add_lora(model, r: int = 8, alpha: int | None = None, dropout: float = 0.0, target_modules=None):
    """Wrap ``model`` with peft LoRA adapters on its family's ``lora_targets`` (the attention projections)."""
    from peft import LoraConfig, get_peft_model  # optional (the convert extra): only LoRA needs it

    if r < 1:
        raise ValueError(f"LoRA rank r={r} must be >= 1")
    spec = family_of(model.config)
    if target_modules is None:
        target_modules = list(spec.lora_targets)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha or 2 * r,
        lora_dropout=dropout,
        target_modules=target_modules,
        fan_in_fan_out=spec.lora_fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


class AnnealedLoss:
    """Wraps a loss_fn: before each training optimizer step, set midpoint_a's a = 2^-k(step)."""

    def __init__(self, loss_fn, anneal, grad_accum: int = 1, start_step: int = 0):
        self.loss_fn, self.anneal, self.grad_accum = loss_fn, anneal, grad_accum
        self.calls = start_step * grad_accum
        self.metric_names = (*getattr(loss_fn, "metric_names", ()), "anneal_k")

    def __call__(self, model, batch):
        if model.training:  # evaluation calls leave the schedule alone
            self.k = self.anneal(model, self.calls // self.grad_accum)
            self.calls += 1
        loss, metrics = self.loss_fn(model, batch)
        return loss, {**metrics, "anneal_k": getattr(self, "k", None)}


def _anneal_schedule(run: Path, anneal, resume: bool):
    """(schedule, first step). A new annealed run records its schedule in RUN/anneal.json; ``resume``
    continues that schedule from the latest good checkpoint's step."""
    path = run / "anneal.json"
    if not resume:
        if list_checkpoints(run):  # refused by the loop
            return anneal, 0
        if anneal is None:
            path.unlink(missing_ok=True)  # left by an annealed start that was refused: not this run's schedule
        else:
            atomic_write(path, json.dumps({"k_start": anneal.k_start, "k_end": anneal.k_end, "steps": anneal.steps}))
        return anneal, 0
    if anneal is not None:
        raise RevLLMError("--resume continues the run's own a-annealing schedule (RUN/anneal.json): give no new one")
    ckpt = latest_good(run)
    if not path.is_file() or ckpt is None:
        return None, 0
    s = json.loads(path.read_text())
    step = json.loads((verify(ckpt) / "trainer_state.json").read_text())["step"]
    return AnnealA(s["k_start"], s["k_end"], s["steps"]), step


def finetune(
    model,
    data,
    out,
    teacher=None,
    loss_fn=None,
    lora: int = 0,
    anneal=None,
    tokenizer=None,
    resume: bool = False,
    **train_options,
) -> dict:
    """Distill (``teacher`` given) or SFT ``model`` on a token directory with the project's training loop.

    Args:
        model: a RevLLMForCausalLM (e.g. from ``revllm.convert``); None with ``resume`` loads the checkpoint's.
        data: token directory from ``revllm data``.
        out: run directory; the final (merged) model goes to ``out/model``.
        teacher: frozen original model; default loss then is ``DistillLoss(teacher)``.
        loss_fn: overrides the loss (``loss_fn(model, batch) -> (loss, metrics)``).
        lora: LoRA rank (0: full fine-tuning).
        anneal: optional ``AnnealA`` (midpoint_a's a toward 1); kept in RUN/anneal.json, and continued on ``resume``.
        **train_options: TrainConfig fields (max_steps, batch_size, seq_len, lr, warmup, eval_interval, ...).
    Returns the loop's summary dict plus ``model`` (the trained, merged model).
    """
    if lora and resume:
        raise RevLLMError("--resume with --lora is not supported: checkpoints of a LoRA run hold the adapters only")
    anneal, start_step = _anneal_schedule(Path(out), anneal, resume)
    if loss_fn is None and teacher is not None:
        loss_fn = DistillLoss(teacher)
    if model is not None and isinstance(loss_fn, DistillLoss):
        loss_fn.check(model)  # before any step or file
    if model is not None:
        c = model.config
        train_options.setdefault("dynamics", c.dynamics)
        train_options.setdefault("block", c.block)
    if lora:
        model = add_lora(model, r=lora)
    cfg = build_config(overrides={"data": str(data), "out": str(out), "resume": resume, **train_options})
    if anneal is not None:
        loss_fn = AnnealedLoss(
            loss_fn or (lambda m, b: (m(input_ids=b["input_ids"], labels=b["input_ids"]).loss, {})),
            anneal,
            cfg.grad_accum,
            start_step,
        )
    # On --resume the checkpoint's config rules: the run-length/bookkeeping keys given here apply, and any
    # other key given must equal the checkpoint's (the loop refuses a change in one line).
    explicit = {k for k, v in train_options.items() if v is not None} | {"data"}
    summary = train(cfg, model=model, loss_fn=loss_fn, teacher=teacher, explicit=explicit)
    if model is None:  # resumed: the loop loaded the model itself; reload the final checkpoint's
        model = load_model(latest_good(Path(out)))
    if isinstance(model, FSDPModule):  # --parallel fsdp2 sharded it in place: gather (collective)
        model = full_model_copy(model)  # None on ranks > 0
    final = None
    if not dist.is_initialized() or dist.get_rank() == 0:  # one writer under torchrun
        final = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        final.eval()
        save_model_atomic(final, Path(out) / "model", tokenizer)
    if dist.is_initialized():
        dist.barrier()
    return {**summary, "model": final}
