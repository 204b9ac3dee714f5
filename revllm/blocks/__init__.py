"""Residual-branch families, one file each. A family provides a Backbone with HF parameter names."""
from .gpt2 import GPT2Backbone, GPT2Block
from .llama import LlamaBackbone, LlamaBlock

BACKBONES = {"gpt2": GPT2Backbone, "llama": LlamaBackbone}

__all__ = ["BACKBONES", "GPT2Backbone", "GPT2Block", "LlamaBackbone", "LlamaBlock"]
