"""Qwen2 converts into the Llama family: the same layer with biases on q, k and v (``qkv_bias``)."""

from __future__ import annotations

from ..errors import RevLLMError
from . import llama
from .spec import HFSource


def translate(c) -> dict:
    if getattr(c, "use_sliding_window", False):  # per-layer windows (max_window_layers): not implemented
        raise RevLLMError("use_sliding_window=True (sliding-window attention) is not supported")
    return {**llama.translate(c), "qkv_bias": True}


HF = HFSource("qwen2", "Qwen2ForCausalLM", "llama", "model.", translate, skip=("rotary_emb.inv_freq",))
