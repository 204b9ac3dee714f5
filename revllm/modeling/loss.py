"""Chunked causal-LM cross-entropy: the LM head and the loss are evaluated a chunk of tokens at a time.

Once the reversible engine removes per-layer activations, the (B*T, V) logits and their gradient are
the largest tensors of a step. Each chunk is wrapped in non-reentrant activation checkpointing, so only
the chunk's hidden states (a view) are kept and the chunk's logits are rebuilt in the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(h, weight, bias, labels):
    logits = F.linear(h, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # fp32 softmax under autocast, as HF does
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(hidden, lm_head, labels, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose (shifted) label is not -100.

    hidden: (B, T, D) final-norm output; labels: (B, T) unshifted, as in HF.
    """
    D = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, D)
    y = labels[:, 1:].reshape(-1).to(hidden.device)
    count = (y != -100).sum()
    # Start from an (empty) sum of hidden: a sequence of one token has no chunks, and its NaN loss must
    # still be part of the graph, as HF's is.
    total = hidden[:, :0].sum().to(torch.promote_types(hidden.dtype, torch.float32))
    for s in range(0, h.shape[0], chunk_tokens):
        hs, ys = h[s : s + chunk_tokens], y[s : s + chunk_tokens]
        if torch.is_grad_enabled() and (hs.requires_grad or lm_head.weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, hs, lm_head.weight, lm_head.bias, ys, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hs, lm_head.weight, lm_head.bias, ys)
    return total / count  # NaN when every label is ignored, as F.cross_entropy(reduction="mean") gives
