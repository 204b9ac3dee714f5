"""Token files: ``revllm data`` writes them (prepare.py), training reads them (tokens.py)."""

from .prepare import documents, held_out, prepare_tokens
from .tokens import TokenData, WindowSampler, read_meta

__all__ = ["TokenData", "WindowSampler", "documents", "held_out", "prepare_tokens", "read_meta"]
