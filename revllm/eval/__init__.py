"""Evaluation: held-out perplexity / KL, and zero-shot tasks through lm-eval's HFLM."""

from .perplexity import evaluate_perplexity, kl_divergence, read_text_tokens, read_token_dir

__all__ = ["evaluate_perplexity", "kl_divergence", "read_text_tokens", "read_token_dir"]
