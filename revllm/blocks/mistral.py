"""Mistral converts into the Llama family; its sliding-window attention becomes ``attention_window``
(a query attends to the ``sliding_window`` most recent positions, itself included, as in HF)."""

from __future__ import annotations

from . import llama
from .spec import HFSource


def translate(c) -> dict:
    return {**llama.translate(c), "attention_window": getattr(c, "sliding_window", None)}


HF = HFSource("mistral", "MistralForCausalLM", "llama", "model.", translate, skip=("rotary_emb.inv_freq",))
