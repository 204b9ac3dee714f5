"""Convert a pretrained Hugging Face causal LM (GPT-2, Llama, Qwen2) into a ``RevLLMForCausalLM``.

Conversion is a config translation plus a key-for-key weight copy (the blocks use HF parameter names;
only GPT-2's backbone prefix ``transformer.`` becomes ``model.``). What changes is the update rule
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

from ..errors import RevLLMError
from ..io import load_source, save_model_atomic
from ..modeling import RevLLMConfig, RevLLMForCausalLM

log = logging.getLogger(__name__)

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _supported_list() -> str:
    return ", ".join(f"{cls} ({mt})" for mt, cls in SUPPORTED.items())


def _rope_theta(c) -> float:
    rp = getattr(c, "rope_parameters", None) or {}
    rope_type = rp.get("rope_type", "default")
    if rope_type != "default":
        raise RevLLMError(f"rope_type={rope_type!r} (RoPE scaling) is not supported; only plain RoPE is")
    return float(rp.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def translate_config(c, **fields) -> RevLLMConfig:
    """RevLLMConfig for an HF config of a supported type; refuses features the blocks do not have."""
    mt = c.model_type
    common = dict(
        vocab_size=c.vocab_size,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        initializer_range=c.initializer_range,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        dropout=0.0,  # fine-tuning a converted model keeps the pretrained model's eval-mode function
    )
    if mt == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if getattr(c, flag, False):
                raise RevLLMError(f"GPT-2 option {flag}=True is not supported")
        if not getattr(c, "scale_attn_weights", True):
            raise RevLLMError("GPT-2 option scale_attn_weights=False is not supported")
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise RevLLMError(f"GPT-2 activation_function={c.activation_function!r} is not supported")
        arch = dict(
            block="gpt2",
            hidden_size=c.n_embd,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            intermediate_size=c.n_inner or 4 * c.n_embd,
            max_position_embeddings=c.n_positions,
            hidden_act=c.activation_function,
            layer_norm_epsilon=c.layer_norm_epsilon,
        )
    elif mt in ("llama", "qwen2"):
        if c.hidden_act != "silu":
            raise RevLLMError(f"hidden_act={c.hidden_act!r} is not supported (SwiGLU with silu only)")
        if getattr(c, "mlp_bias", False):
            raise RevLLMError("mlp_bias=True is not supported")
        if getattr(c, "use_sliding_window", False):
            raise RevLLMError("use_sliding_window=True (sliding-window attention) is not supported")
        arch = dict(
            block="llama",
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=_rope_theta(c),
            attention_bias=bool(getattr(c, "attention_bias", False)),
            qkv_bias=mt == "qwen2",  # Qwen2: biases on q, k, v only
        )
    else:
        raise RevLLMError(f"unsupported architecture {mt!r}; supported: {_supported_list()}")
    return RevLLMConfig(**common, **arch, **fields)


def dynamics_fields(dynamics: str, k: int, step_size, initial_state: str, **options) -> dict:
    """RevLLMConfig fields of one conversion recipe."""
    fields = dict(dynamics=dynamics, step_size=1.0 if step_size is None else float(step_size), initial_state=initial_state)
    if dynamics == "midpoint_a":
        from ..dynamics.fixedpoint import MAX_DYADIC_BITS

        if not isinstance(k, int) or not 0 <= k <= MAX_DYADIC_BITS:
            raise ValueError(f"k={k!r} must be an integer in [0, {MAX_DYADIC_BITS}] (a = 2^-k)")
        fields["midpoint_a"] = 2.0**-k
        # Float reconstruction would amplify error by 2^k per layer; exact reversal (fixed-point streams,
        # a k-bit buffer for the bits a*p drops) makes it bit-exact instead, and lifts the |a| floor.
        fields["exact_reversal"] = True
    fields.update({k2: v for k2, v in options.items() if v is not None})
    return fields


def _hf_state_dict(src) -> dict:
    sd = src.state_dict()
    prefix = "transformer." if src.config.model_type == "gpt2" else "model."
    out = {}
    for key, t in sd.items():
        # Non-weight buffers that some transformers versions persist (GPT-2's causal 'bias' table).
        if key.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue
        out[("model." + key[len(prefix):]) if key.startswith(prefix) else key] = t
    return out


@torch.no_grad()
def convert(model_or_path, dynamics: str = "midpoint_a", k: int = 4, step_size: float | None = None,
            initial_state: str = "fixed_point", dtype=torch.float32, **options) -> RevLLMForCausalLM:
    """Build a reversible model from a pretrained HF causal LM, copying every weight.

    Args:
        model_or_path: a GPT2LMHeadModel / LlamaForCausalLM / Qwen2ForCausalLM, an HF model directory,
            or a .gguf file.
        dynamics: update rule between layers (default ``midpoint_a``, near-Euler with a = 2^-k).
        k: midpoint_a's coefficient exponent, a = 2^-k.
        step_size: h; default 1.0, the residual network's step.
        initial_state: ``fixed_point`` (p_{-1} = p_0 - h f_0(p_0), the paper's retrofit), ``copy``, ``zero``.
        dtype: parameter dtype of the result.
        **options: further RevLLMConfig fields (``memory_free``, ``loss_chunk_size``, ...).
    """
    from transformers import PreTrainedModel

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

