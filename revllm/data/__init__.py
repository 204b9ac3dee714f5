"""Token files: ``revllm data`` writes them (prepare.py), training reads them (tokens.py)."""
from .prepare import prepare_tokens
from .tokens import TokenData, WindowSampler, read_meta

__all__ = ["TokenData", "WindowSampler", "prepare_tokens", "read_meta"]
