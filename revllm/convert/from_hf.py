"""Convert a pretrained Hugging Face causal LM (GPT-2, Llama, Qwen2, Mistral, Gemma) into a ``RevLLMForCausalLM``.

Conversion is a config translation plus a key-for-key weight copy, both given by the architecture's
``HFSource`` in ``revllm.blocks`` (the blocks use HF parameter names; the backbone prefix, e.g. GPT-2's
``transformer.``, becomes ``model.``). What changes is the update rule
between layers:

* ``euler``: p_{j+1} = p_j + f_j(p_j), the original network; reproduces its logits up to rounding.
* ``midpoint_a`` with a = 2^-k (the default, "near-Euler", project section 9):
  p_{j+1} = p_j + f_j(p_j) - a (p_j - p_{j-1}); close to the original for small a.
* ``midpoint`` / ``leapfrog`` / ``hamiltonian``: the paper's retrofit (section 4). The missing earlier
  state is one fixed-point step p_{-1} = p_0 - h f_0(p_0) (``initial_state="fixed_point"``).

The pretrained weights were trained with the residual's unit step, so every rule defaults to h = 1 here
(midpoint then reads p_{j+1} = p_{j-1} + 2 f_j(p_j), and with the fixed-point start its first layer is
exactly the residual one), unlike RevLLMConfig's from-scratch midpoint default of 2h = 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..blocks import HF_SOURCES
from ..dynamics.fixedpoint import MAX_DYADIC_BITS
from ..errors import RevLLMError
from ..io import load_source, save_model_atomic
from ..modeling import RevLLMConfig, RevLLMForCausalLM

log = logging.getLogger(__name__)

SUPPORTED = {mt: source.hf_class for mt, source in HF_SOURCES.items()}  # model_type -> HF class


def _supported_list() -> str:
    return ", ".join(f"{cls} ({mt})" for mt, cls in SUPPORTED.items())


def translate_config(c, **fields) -> RevLLMConfig:
    """RevLLMConfig for an HF config of a supported type; its family's source refuses what the blocks lack."""
    source = HF_SOURCES.get(c.model_type)
    if source is None:
        raise RevLLMError(f"unsupported architecture {c.model_type!r}; supported: {_supported_list()}")
    common = dict(
        vocab_size=c.vocab_size,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        initializer_range=c.initializer_range,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        dropout=0.0,  # fine-tuning a converted model keeps the pretrained model's eval-mode function
    )
    return RevLLMConfig(**common, **source.translate(c), **fields)


def dynamics_fields(dynamics: str, k: int, step_size, initial_state: str, **options) -> dict:
    """RevLLMConfig fields of one conversion recipe."""
    fields = dict(
        dynamics=dynamics, step_size=1.0 if step_size is None else float(step_size), initial_state=initial_state
    )
    if dynamics == "midpoint_a":
        if not isinstance(k, int) or not 0 <= k <= MAX_DYADIC_BITS:
            raise ValueError(f"k={k!r} must be an integer in [0, {MAX_DYADIC_BITS}] (a = 2^-k)")
        fields["midpoint_a"] = 2.0**-k
        # Float reconstruction would amplify error by 2^k per layer; exact reversal (fixed-point streams,
        # a k-bit buffer for the bits a*p drops) makes it bit-exact instead, and lifts the |a| floor.
        fields["exact_reversal"] = True
    fields.update({k2: v for k2, v in options.items() if v is not None})
    return fields


def _hf_state_dict(src) -> dict:
    """The source's weights under revllm's keys (its family's prefix becomes ``model.``)."""
    source = HF_SOURCES[src.config.model_type]
    return {source.map_key(key): t for key, t in src.state_dict().items() if not key.endswith(source.skip)}


@torch.no_grad()
def convert(
    model_or_path,
    dynamics: str = "midpoint_a",
    k: int = 4,
    step_size: float | None = None,
    initial_state: str = "fixed_point",
    dtype=torch.float32,
    **options,
) -> RevLLMForCausalLM:
    """Build a reversible model from a pretrained HF causal LM, copying every weight.

    Args:
        model_or_path: an HF causal LM of a supported architecture (``SUPPORTED``), an HF model
            directory, or a .gguf file.
        dynamics: update rule between layers (default ``midpoint_a``, near-Euler with a = 2^-k).
        k: midpoint_a's coefficient exponent, a = 2^-k.
        step_size: h; default 1.0, the residual network's step.
        initial_state: ``fixed_point`` (p_{-1} = p_0 - h f_0(p_0), the paper's retrofit), ``copy``, ``zero``.
        dtype: parameter dtype of the result.
        **options: further RevLLMConfig fields (``memory_free``, ``loss_chunk_size``, ...).
    """
    src = model_or_path if isinstance(model_or_path, PreTrainedModel) else load_source(model_or_path, dtype, SUPPORTED)
    mt = getattr(src.config, "model_type", None)
    if mt not in SUPPORTED:
        raise RevLLMError(f"unsupported architecture {type(src).__name__} ({mt}); supported: {_supported_list()}")
    cfg = translate_config(src.config, **dynamics_fields(dynamics, k, step_size, initial_state, **options))
    rev = RevLLMForCausalLM(cfg).to(dtype)
    weights = _hf_state_dict(src)
    result = rev.load_state_dict({k2: v.to(dtype) for k2, v in weights.items()}, strict=False)
    allowed_missing = {"dynamics.a"} | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RevLLMError(
            f"weight copy failed: missing {sorted(missing)[:8]}, unexpected {sorted(result.unexpected_keys)[:8]}"
        )
    if cfg.tie_word_embeddings:
        rev.tie_weights()
    if getattr(src, "generation_config", None) is not None:
        rev.generation_config = src.generation_config
    rev.eval()
    log.info("converted %s (%d weights) to dynamics=%s", type(src).__name__, len(weights), dynamics)
    return rev


def save_converted(model: RevLLMForCausalLM, out, tokenizer=None) -> Path:
    """save_pretrained into a new (or empty) ``out`` atomically, with the tokenizer alongside."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RevLLMError(f"output directory {out} exists and is not empty")
    return save_model_atomic(model, out, tokenizer)
