"""Attention: one fixed signature, two implementations (sdpa for speed, eager as the test oracle).

Shapes: q (B, H, T, K); k, v (B, Hkv, S, K) with H a multiple of Hkv (grouped-query attention).
``mask`` is None (pure causal, T == S) or a boolean (B, 1, T, S) tensor, True = attend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sdpa(q, k, v, mask=None, dropout_p=0.0, scale=None):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, scale=scale, enable_gqa=gqa
    )


def eager(q, k, v, mask=None, dropout_p=0.0, scale=None):
    """Reference: explicit softmax(QK^T)V. Used by tests to check ``sdpa``."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if mask is None:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.softmax(-1), p=dropout_p)
    return probs @ v


def build_mask(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device, window: int | None = None
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) causal mask with padded keys removed, or None for plain causal attention.

    None only when T == S and nothing is padded: sdpa's ``is_causal`` aligns its triangle to the top
    left, which is wrong for cached decoding (T new queries after S - T cached keys), so T != S always
    gets an explicit bottom-right-aligned mask. A query always sees itself, so fully padded rows (left
    padding) stay finite instead of NaN. ``window``: sliding-window attention, a query at position q
    sees keys at q - window < s <= q (HF's ``sliding_window``); it only matters once S > window.
    """
    offset = kv_len - q_len
    windowed = window is not None and kv_len > window
    if q_len == kv_len and not windowed and (attention_mask is None or bool(attention_mask.all())):
        return None
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(offset)
    if windowed:
        causal = causal.triu(offset - window + 1)
    if attention_mask is None:
        return causal[None, None]  # (1, 1, T, S), broadcast over the batch
    keys = attention_mask[:, None, None, :kv_len].to(torch.bool)
    diag = torch.zeros(q_len, kv_len, dtype=torch.bool, device=device)
    diag[torch.arange(q_len), torch.arange(q_len) + offset] = True
    return (causal & keys) | diag
