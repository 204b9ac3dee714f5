"""Causal-LM cross-entropy, chunked when the logits would exceed one chunk.

Once the reversible engine removes per-layer activations, the (B*T, V) logits and their gradient are
the largest tensors of a step. Beyond ``chunk_tokens`` tokens, the LM head and the loss are evaluated a
chunk at a time, each chunk wrapped in non-reentrant activation checkpointing, so only the chunk's
hidden states (a view) are kept and the chunk's logits are rebuilt in the backward: the loss's peak is
one chunk's logits, at the price of a second LM-head forward.

Adaptive: when all tokens fit in one chunk (``loss_path``), the full logits are what one chunk would
hold anyway, and checkpointing that single chunk would not lower the peak (the backward rebuilds the
same logits) but would cost the second LM-head forward. So they are computed directly, exactly as HF
does. ``chunk_tokens`` is thus the memory the user allows for logits: chunk_tokens * V elements.
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


def loss_path(n_tokens: int, chunk_tokens: int) -> str:
    """``"full"`` (one pass, no recompute) when the tokens fit in one chunk, else ``"chunked"``."""
    return "full" if n_tokens <= chunk_tokens else "chunked"


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
    grad = torch.is_grad_enabled() and (h.requires_grad or lm_head.weight.requires_grad)
    if loss_path(h.shape[0], chunk_tokens) == "full":
        return (total + _chunk_loss_sum(h, lm_head.weight, lm_head.bias, y)) / count
    for s in range(0, h.shape[0], chunk_tokens):
        hs, ys = h[s : s + chunk_tokens], y[s : s + chunk_tokens]
        if grad:
            total = total + checkpoint(_chunk_loss_sum, hs, lm_head.weight, lm_head.bias, ys, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hs, lm_head.weight, lm_head.bias, ys)
    return total / count  # NaN when every label is ignored, as F.cross_entropy(reduction="mean") gives
