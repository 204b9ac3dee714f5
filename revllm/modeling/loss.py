"""Causal-LM cross-entropy without the (B*T, V) logits of ordinary autograd.

Once the reversible engine removes per-layer activations, the logits and their gradient are the largest
tensors of a step. Three paths, chosen by ``loss_path``:

* ``"fused"`` (fp32 / fp64, no autocast): one autograd Function evaluates the LM head a chunk of
  ``chunk_tokens`` rows at a time into a single reused logits buffer and, when a gradient is needed,
  computes the gradients of the hidden states, weight and bias in the same pass (the loss is the last
  node of the graph, so its gradient is known up to the scalar the backward multiplies by). Three
  matmuls per chunk, as the full logits take, no recompute, and no fresh (chunk, V) tensors per chunk:
  on CPU those were ~6 fresh mmaps of 192 MiB per 1k-token chunk, and their page faults a third of a
  small model's step (issue 15). It holds one chunk's logits plus a weight-sized gradient.
* ``"full"`` (low precision or autocast, all tokens in one chunk): the logits directly, as HF computes them.
* ``"chunked"`` (low precision or autocast, more tokens): each chunk's head and loss under non-reentrant
  activation checkpointing; the chunk's logits are rebuilt in the backward.

``chunk_tokens`` is thus the memory the user allows for logits: chunk_tokens * V elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss_sum(h, weight, bias, labels):
    logits = F.linear(h, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # fp32 softmax under autocast, as HF does
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows with label != -100 of cross_entropy(h W^T + b, label); gradients made in the forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk_tokens):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        n = h.shape[0]
        keep = (labels != IGNORE).unsqueeze(1)
        target = torch.where(keep.squeeze(1), labels, 0).unsqueeze(1)
        buf = h.new_empty(min(chunk_tokens, n), weight.shape[0])  # the one (chunk, V) tensor, reused
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        total = h.new_zeros(())
        for s in range(0, n, chunk_tokens):
            hs, ys, ks = h[s : s + chunk_tokens], target[s : s + chunk_tokens], keep[s : s + chunk_tokens]
            z = buf[: hs.shape[0]]
            if bias is None:
                torch.mm(hs, weight.t(), out=z)
            else:
                torch.addmm(bias, hs, weight.t(), out=z)
            picked = z.gather(1, ys)
            m = z.amax(1, keepdim=True)
            sumexp = z.sub_(m).exp_().sum(1, keepdim=True)  # z now holds exp(logits - max)
            nll = sumexp.log() + m - picked
            total += torch.where(ks, nll, 0).sum()  # ignored rows add nothing, even a NaN
            if need_h or need_w or need_b:
                z.div_(sumexp).scatter_add_(1, ys, z.new_full(ys.shape, -1.0))  # softmax - onehot
                z.masked_fill_(~ks, 0)
                if need_h:
                    torch.mm(z, weight, out=grad_h[s : s + chunk_tokens])
                if need_w:
                    grad_w.addmm_(z.t(), hs)
                if need_b:
                    grad_b += z.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = [None if g is None else g * grad_out for g in (grad_h, grad_w, grad_b)]
        return *scale, None, None


def loss_path(n_tokens: int, chunk_tokens: int, dtype: torch.dtype = torch.float32, autocast: bool = False) -> str:
    """``"fused"`` for fp32 / fp64 without autocast; otherwise ``"full"`` (one pass, no recompute) when the
    tokens fit in one chunk, else ``"chunked"``."""
    if dtype in (torch.float32, torch.float64) and not autocast and not torch.compiler.is_compiling():
        return "fused"
    return "full" if n_tokens <= chunk_tokens else "chunked"


def chunked_causal_lm_loss(hidden, lm_head, labels, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose (shifted) label is not -100.

    hidden: (B, T, D) final-norm output; labels: (B, T) unshifted, as in HF.
    """
    D = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, D)
    y = labels[:, 1:].reshape(-1).to(hidden.device)
    count = (y != IGNORE).sum()
    # Start from an (empty) sum of hidden: a sequence of one token has no chunks, and its NaN loss must
    # still be part of the graph, as HF's is.
    total = hidden[:, :0].sum().to(torch.promote_types(hidden.dtype, torch.float32))
    kind = hidden.device.type
    autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
    path = loss_path(h.shape[0], chunk_tokens, h.dtype, autocast)
    if path == "fused":
        return (total + LinearCrossEntropy.apply(h, lm_head.weight, lm_head.bias, y, chunk_tokens)) / count
    grad = torch.is_grad_enabled() and (h.requires_grad or lm_head.weight.requires_grad)
    if path != "chunked":
        return (total + _chunk_loss_sum(h, lm_head.weight, lm_head.bias, y)) / count
    for s in range(0, h.shape[0], chunk_tokens):
        hs, ys = h[s : s + chunk_tokens], y[s : s + chunk_tokens]
        if grad:
            total = total + checkpoint(_chunk_loss_sum, hs, lm_head.weight, lm_head.bias, ys, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hs, lm_head.weight, lm_head.bias, ys)
    return total / count  # NaN when every label is ignored, as F.cross_entropy(reduction="mean") gives
