"""Held-out loss / perplexity and the KL distance between two models, on a token stream.

Tokens come from a ``revllm data`` directory (``val.bin`` + ``meta.json``), a raw text file tokenized with
the model's tokenizer, or any 1-D id tensor. Windows are consecutive and non-overlapping (the last
partial one included), so every token after a window's first is scored exactly once.
Shape legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import RevLLMError, read_json


def read_token_dir(path, split: str = "val", max_tokens: int | None = None) -> torch.Tensor:
    """The ``split``.bin ids of a ``revllm data`` directory as a 1-D int64 tensor (only the first
    ``max_tokens`` are read: a large train split is never copied whole)."""
    d = Path(path)
    meta = read_json(d / "meta.json", f"{d} has no meta.json: not a token directory from `revllm data`")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    f = d / f"{split}.bin"
    if not f.is_file() or f.stat().st_size == 0:
        raise RevLLMError(f"token file {f} is missing or empty")
    if f.stat().st_size % dtype.itemsize:
        raise RevLLMError(f"token file {f} is truncated (size is not a multiple of {dtype.itemsize} bytes)")
    return torch.from_numpy(np.memmap(f, dtype=dtype, mode="r")[: max_tokens or None].astype(np.int64))


def read_text_tokens(tokenizer, path) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RevLLMError(f"{p} is not UTF-8 text") from None
    if not text.strip():
        raise RevLLMError(f"text file {p} is empty")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Consecutive windows of at most ``seq_len`` ids (the last may be shorter; length-1 tails dropped)."""
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    if max_tokens:
        ids = ids[:max_tokens]
    out = [ids[s : s + seq_len] for s in range(0, len(ids), seq_len)]
    out = [w for w in out if len(w) > 1]
    if not out:
        raise RevLLMError(f"the text has {len(ids)} tokens: too few to score")
    return out


def _batches(wins, batch_size):
    """Group equal-length windows into (B, T) batches."""
    by_len: dict[int, list] = {}
    for w in wins:
        by_len.setdefault(len(w), []).append(w)
    for group in by_len.values():
        for s in range(0, len(group), batch_size):
            yield torch.stack(group[s : s + batch_size])


@torch.no_grad()
def evaluate_perplexity(
    model,
    ids: torch.Tensor,
    seq_len: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict:
    """Mean next-token cross-entropy and perplexity of ``model`` over ``ids``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = list(_batches(windows(ids, seq_len, max_tokens), batch_size))
    for x in tqdm(batches, desc="perplexity", disable=not progress):
        x = x.to(device)
        logits = model(input_ids=x).logits[:, :-1].double()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


@torch.no_grad()
def kl_divergence(
    reference, model, ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4, max_tokens: int | None = None
) -> float:
    """Mean over positions of KL(reference || model) between next-token distributions, in nats."""
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in (reference, model)]
    for m, _ in modes:
        m.eval()  # dropout off: the KL of the two models, not of two dropout draws
    total, count = 0.0, 0
    for x in _batches(windows(ids, seq_len, max_tokens), batch_size):
        x = x.to(device)
        lp = F.log_softmax(reference(input_ids=x).logits.double(), -1)  # (B, T, V)
        lq = F.log_softmax(model(input_ids=x).logits.double(), -1)
        total += (lp.exp() * (lp - lq)).sum().item()
        count += x.numel()
    for m, was_training in modes:
        m.train(was_training)
    return total / count
