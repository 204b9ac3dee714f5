"""Resolve what the user names as a model: a run directory, a checkpoint, a Hugging Face model
directory, a .gguf file, or ``smollm2`` (the embedded SmolLM2-135M-Instruct). Offline, safetensors
only, no remote code. (Kept local to eval until the training package's checkpoint loader is shared.)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import RevLLMError


def offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def resolve_model_dir(path) -> Path:
    """Run dir -> its newest checkpoint's model/ (or RUN/model); checkpoint dir -> model/; HF dir -> itself."""
    if str(path) == "smollm2":
        from ..assets import smollm2_model_dir

        return smollm2_model_dir()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model {p} does not exist")
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    ckpts = sorted(q for q in (p / "checkpoints").glob("*") if (q / "model" / "config.json").is_file()) \
        if (p / "checkpoints").is_dir() else []
    if ckpts:
        return ckpts[-1] / "model"
    raise RevLLMError(f"{p} is not a run directory, a checkpoint or a Hugging Face model directory (no config.json)")


def load_model(path, dtype=torch.float32):
    offline()
    import revllm  # noqa: F401  (registers RevLLMConfig with the Auto classes)
    from transformers import AutoModelForCausalLM

    if str(path).endswith(".gguf"):
        from ..convert.from_hf import load_source

        return load_source(path, dtype)
    d = resolve_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(d, dtype=dtype, local_files_only=True, use_safetensors=True,
                                                    trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RevLLMError(f"cannot load model from {d}: {msg}") from None


def load_tokenizer(path, required: bool = True):
    """The tokenizer saved with a model (model dir, or its run/checkpoint), or None if not required."""
    offline()
    from transformers import AutoTokenizer

    try:
        if str(path).endswith(".gguf"):
            p = Path(path)
            return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        return AutoTokenizer.from_pretrained(resolve_model_dir(path), local_files_only=True)
    except (OSError, ValueError) as e:
        if required:
            raise RevLLMError(f"no tokenizer found with model {path} ({str(e).splitlines()[0]})") from None
        return None
