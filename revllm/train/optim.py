"""AdamW parameter groups and the warmup + cosine schedule (nanoGPT's recipe).

Decoupled weight decay (AdamW) applies to matrices only: norms, biases and embeddings (and so the tied
LM head) are not decayed, as in nanoGPT/GPT-2 practice.
"""

from __future__ import annotations

import math

import torch


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        embedding = any(k in name for k in ("embed", "wte", "wpe", "lm_head"))
        (decay if p.dim() >= 2 and not embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, cfg) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False
    )  # foreach off: identical arithmetic on every backend


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    ratio = cfg.min_lr / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.max_steps, ratio))
