"""Conversion of pretrained HF LLMs into reversible ones, and distillation fine-tuning."""

from ..io import load_source, load_source_tokenizer
from .from_hf import SUPPORTED, convert, save_converted

__all__ = ["SUPPORTED", "convert", "load_source", "load_source_tokenizer", "save_converted"]
