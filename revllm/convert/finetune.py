"""Conversion fine-tuning: distillation (or plain SFT) of a converted model, with optional LoRA and a-annealing.

``finetune(...)`` is a small self-contained loop (AdamW, linear warmup, random windows of a token
stream, tqdm progress, ``metrics.csv``, the final model saved atomically with save_pretrained). It
exists because the project's full training loop (``revllm.train``: checkpoint/resume, accelerate,
TensorBoard) had not landed when this was written; the loss interface is the same
``loss_fn(model, batch) -> (loss, metrics)``, so switching is a call-site change.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import RevLLMError


def causal_lm_loss(model, batch):
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids).loss, {}


def add_lora(model, r: int = 8, alpha: int | None = None, dropout: float = 0.0, target_modules=None):
    """Wrap ``model`` with peft LoRA adapters on the attention projections (GPT-2: c_attn, c_proj)."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA rank r={r} must be >= 1")
    if target_modules is None:
        block = getattr(model.config, "block", getattr(model.config, "model_type", "llama"))
        target_modules = ["c_attn", "attn.c_proj"] if block == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules=target_modules,
                     fan_in_fan_out=getattr(model.config, "block", "") == "gpt2", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _save_atomic(model, out: Path, tokenizer=None):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = out.with_name(out.name + ".old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finetune(model, tokens: torch.Tensor, out, loss_fn=None, steps: int = 100, batch_size: int = 4,
             seq_len: int = 128, lr: float = 1e-4, warmup: int = 10, weight_decay: float = 0.0,
             grad_clip: float = 1.0, seed: int = 0, anneal=None, tokenizer=None, merge_lora: bool = True,
             progress: bool = True) -> dict:
    """Train ``model`` on random windows of ``tokens`` (1-D ids) and save it to ``out/model``.

    Args:
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``; default causal-LM cross-entropy (SFT).
        anneal: optional ``AnnealA``: sets midpoint_a's a = 2^-k(step) before each step.
        merge_lora: a peft-wrapped model is merged (merge_and_unload) before saving.
    Returns the summary dict (also written to ``out/summary.json``).

    Under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP
    (revllm.parallel): ``batch_size`` is per process, each rank takes its rows of one global batch,
    and only rank 0 writes ``out``.
    """
    from tqdm.auto import tqdm

    from ..parallel import init_distributed, parallelize, unwrap

    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, seq_len={seq_len} must be >= 1, 1, 2")
    if len(tokens) < seq_len + 1:
        raise RevLLMError(f"the training text has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loss_fn = loss_fn or causal_lm_loss
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        rank, world, _ = init_distributed()
        model = parallelize(model, "ddp")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    device = next(model.parameters()).device
    model.train()
    rows, t0, seen = [], time.perf_counter(), 0
    bar = tqdm(range(steps), desc="finetune", disable=not progress or rank != 0)
    for step in bar:
        k = anneal(unwrap(model), step) if anneal is not None else None
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size * world)[rank * batch_size:(rank + 1) * batch_size]
        x = torch.stack([tokens[s : s + seq_len] for s in starts]).to(device)
        loss, metrics = loss_fn(model, {"input_ids": x})
        if not torch.isfinite(loss):
            raise RevLLMError(f"loss became {loss.item()} at step {step}: lower --lr; nothing was saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        seen += x.numel() * world
        if world > 1:  # log the global batch's loss
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= world
        row = {"step": step + 1, "tokens": seen, "loss": loss.item(), "lr": sched.get_last_lr()[0],
               "elapsed_s": time.perf_counter() - t0, **metrics}
        if k is not None:
            row["k"] = k
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    elapsed = time.perf_counter() - t0
    model = unwrap(model)
    summary = {"steps": steps, "tokens": seen, "final_loss": rows[-1]["loss"], "elapsed_s": elapsed,
               "tokens_per_s": seen / elapsed, "first_loss": rows[0]["loss"]}
    if rank != 0:  # rank 0 writes the outputs; the others wait for it
        torch.distributed.barrier()
        return {**summary, "model": model}
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(dict.fromkeys(key for r in rows for key in r)))
        w.writeheader()
        w.writerows(rows)
    final = model
    if merge_lora and hasattr(model, "merge_and_unload"):
        final = model.merge_and_unload()
    final.eval()
    _save_atomic(final, out / "model", tokenizer)
    if math.isfinite(summary["final_loss"]):
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if world > 1:
        torch.distributed.barrier()
    return {**summary, "model": final}
