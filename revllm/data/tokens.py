"""Reading token files: ``TokenData`` (memmaps + meta, validated) and ``WindowSampler``.

The sampler draws random windows of ``seq_len`` tokens with a numpy ``Generator`` whose state is part
of every checkpoint, so a resumed run sees exactly the batches an uninterrupted one would.
Validation uses fixed, evenly spaced windows of val.bin: every evaluation scores the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import RevLLMError


def read_meta(data_dir) -> dict:
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"token directory {d} does not exist (make it with `revllm data`)")
    m = d / "meta.json"
    if not m.is_file():
        raise RevLLMError(f"{d} has no meta.json: not a token directory, or `revllm data` did not finish")
    try:
        return json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise RevLLMError(f"{m} is corrupted ({e.msg})") from None


class TokenData:
    def __init__(self, data_dir):
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        self.dtype = np.dtype(self.meta.get("dtype", "uint16"))
        self.vocab_size = int(self.meta["tokenizer"]["vocab_size"])
        self.train = self._open("train")
        self.val = self._open("val")

    def _open(self, split):
        p = self.dir / f"{split}.bin"
        if not p.is_file():
            raise FileNotFoundError(f"token file {p} is missing")
        size = p.stat().st_size
        if size == 0:
            raise RevLLMError(f"token file {p} is empty")
        if size % self.dtype.itemsize:
            raise RevLLMError(f"token file {p} is truncated ({size} bytes is not a multiple of {self.dtype.itemsize})")
        expect = self.meta.get(f"{split}_tokens")
        if expect is not None and size // self.dtype.itemsize != expect:
            raise RevLLMError(f"token file {p} has {size // self.dtype.itemsize} tokens, meta.json says {expect}")
        return np.memmap(p, dtype=self.dtype, mode="r")

    def check(self, seq_len: int, vocab_size: int, tokenizer: dict | None = None):
        """One-line errors for every way the token files cannot feed this model. ``tokenizer``: the model's
        ``revllm.io.tokenizer_identity`` (name, sha256), when it has one."""
        if self.vocab_size > vocab_size:
            raise RevLLMError(
                f"token files use a {self.vocab_size}-token vocabulary but the model has {vocab_size}: "
                "tokenize with the model's tokenizer"
            )
        ours, theirs = (tokenizer or {}).get("sha256"), self.meta["tokenizer"].get("sha256")
        if ours and theirs and ours != theirs:
            raise RevLLMError(
                f"token files in {self.dir} were made with a different tokenizer ({self.meta['tokenizer']['name']!r}) "
                f"than the model's ({tokenizer['name']!r}); re-run `revllm data` with the model's tokenizer"
            )
        for split, arr in (("train", self.train), ("val", self.val)):
            if len(arr) < seq_len + 1:
                raise RevLLMError(
                    f"{split}.bin has {len(arr)} tokens, fewer than one window of seq_len={seq_len}"
                    + (" (lower --seq-len or raise --val-fraction)" if split == "val" else "")
                )


class WindowSampler:
    """Random ``(batch, seq_len)`` windows of a token memmap; state() / load_state() for exact resume."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rng = np.random.default_rng(seed)

    def next(self) -> torch.Tensor:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len + 1, size=self.batch_size)
        return torch.from_numpy(np.stack([self.tokens[s : s + self.seq_len] for s in starts]).astype(np.int64))

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, st: dict):
        self.rng.bit_generator.state = st


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int, iters: int):
    """Fixed, evenly spaced validation windows (the same every evaluation)."""
    n = max(1, min(iters * batch_size, len(tokens) // seq_len))
    starts = np.linspace(0, len(tokens) - seq_len, n).astype(np.int64)
    for i in range(0, n, batch_size):
        yield torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts[i : i + batch_size]]).astype(np.int64))
