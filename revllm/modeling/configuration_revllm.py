"""RevLLMConfig: a transformers ``PreTrainedConfig`` for reversible decoder-only LMs.

Field names follow Hugging Face (``num_hidden_layers``, ``hidden_size``, ...). The reversible fields:

* ``block``: residual-branch family, a key of ``revllm.blocks.FAMILIES``: ``"gpt2"`` (LayerNorm, learned
  positions, GELU, biases), ``"llama"`` (RMSNorm, RoPE, SwiGLU, GQA; ``qkv_bias`` covers Qwen2,
  ``attention_window`` Mistral) or ``"gemma"`` (Llama's layout with GeGLU, (1 + w) RMSNorm, sqrt(D)
  embedding scale). What each family accepts is its ``FamilySpec``.
* ``dynamics``: ``euler`` | ``midpoint`` | ``leapfrog`` | ``midpoint_a`` | ``hamiltonian``.
* ``step_size``: h; ``None`` picks the rule's default (midpoint 0.5 so that 2h = 1, others 1.0).
* ``initial_state``: the second initial stream, which the paper leaves open.
  ``"copy"`` (default): p_{-1} = p_0 (Hamiltonian: q_0 = p_0); ``"zero"``: p_{-1} = 0;
  ``"fixed_point"``: p_{-1} = p_0 - f_0(p_0), one inverted residual step (the paper's retrofit, section 4).
  The newest stream (p_L) always feeds the final norm and the LM head.
* ``memory_free``: reversible backward (default for reversible rules) or ordinary stored autograd.
* ``midpoint_a`` / ``midpoint_a_seed`` / ``midpoint_a_floor``: midpoint_a's coefficients.
* ``exact_reversal`` / ``exact_fraction_bits``: hold the streams as int64 fixed point with that many
  fractional bits, so the memory-free backward reconstructs every state bit for bit (midpoint_a needs
  dyadic a_j = m/2^k; ``midpoint_a_dyadic_bits`` rounds the random draw to such a grid).
* ``drift_monitor`` / ``drift_threshold`` / ``drift_fallback``: reconstruction-drift diagnostics (debug
  per-layer errors against a stored forward; warn above the threshold; optionally use the stored states).
* ``attention_window``: sliding-window attention (a query sees its ``attention_window`` most recent
  positions, itself included); None: full causal attention.
* ``stored_layers``: layers that take the plain residual step p_{j+1} = p_j + f_j(p_j) instead of the
  rule, and whose input the memory-free backward keeps instead of reconstructing (one stream each): a
  per-layer choice of rule for the few layers a conversion cannot make reversible (issue 14).
* ``loss_chunk_size``: tokens per chunk of the LM-head cross-entropy: at most loss_chunk_size x V logits
  exist at once (fp32 / fp64: one reused buffer; low precision: the full logits when they fit in one chunk,
  as HF computes them, else checkpointed chunks; see ``modeling/loss.py``).
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from ..blocks import FAMILIES
from ..dynamics import DYNAMICS
from ..dynamics import fixedpoint as fxp
from ..dynamics.midpoint import draw_midpoint_a

INITIAL_STATES = ("copy", "zero", "fixed_point")


class RevLLMConfig(PretrainedConfig):
    model_type = "revllm"
    keys_to_ignore_at_inference = ["past_key_values"]

    block: str = "llama"
    dynamics: str = "midpoint"
    step_size: float | None = None
    initial_state: str = "copy"
    memory_free: bool | None = None

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    hidden_act: str | None = None
    rms_norm_eps: float = 1e-5
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False
    qkv_bias: bool = False
    attention_window: int | None = None
    dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    loss_chunk_size: int = 1024

    stored_layers: list | None = None

    midpoint_a: float | list | None = None
    midpoint_a_seed: int = 0
    midpoint_a_floor: float = 0.25
    midpoint_a_dyadic_bits: int | None = None

    # Exact reversal. Default off: its cost was not shown to be <= 5% (CPU end-to-end timings were
    # noise-bound; the stream arithmetic alone is +1.5..+4% per step for midpoint/leapfrog/hamiltonian
    # and +7..8% for midpoint_a at d=128) and int64 streams double the held stream memory.
    # See benchmarks/results/exact_reversal.md.
    exact_reversal: bool = False
    exact_fraction_bits: int = 32
    drift_monitor: bool = False
    drift_threshold: float | None = None
    drift_fallback: bool = False

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self, **kwargs):
        if self.dynamics not in DYNAMICS:
            raise ValueError(f"dynamics={self.dynamics!r} is unknown; allowed: {', '.join(sorted(DYNAMICS))}")
        if self.block not in FAMILIES:
            raise ValueError(f"block={self.block!r} is unknown; allowed: {', '.join(FAMILIES)}")
        if self.initial_state not in INITIAL_STATES:
            raise ValueError(f"initial_state={self.initial_state!r} is unknown; allowed: {', '.join(INITIAL_STATES)}")
        rule = DYNAMICS[self.dynamics]
        if self.step_size is None:
            self.step_size = rule.default_step_size
        if not (isinstance(self.step_size, (int, float)) and self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError(f"step_size={self.step_size!r} must be a finite number > 0")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "loss_chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_act is None:
            self.hidden_act = FAMILIES[self.block].activations[0]
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        self._check_fields()

        if self.memory_free is None:
            self.memory_free = rule.reversible
        elif self.memory_free and not rule.reversible:
            # Refused rather than silently falling back: the user asked for something impossible.
            raise ValueError(
                f"memory_free=True needs a reversible dynamics; {self.dynamics!r} is not "
                f"(use one of {', '.join(sorted(k for k, v in DYNAMICS.items() if v.reversible))}, or memory_free=False)"
            )
        self._check_exact(rule)
        self._check_stored_layers()
        if self.dynamics == "midpoint_a":
            self._check_midpoint_a()
        super().__post_init__(**kwargs)

    def _check_fields(self):
        """Values the blocks would otherwise take silently (or fail on deep inside torch)."""
        for name in ("num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("rms_norm_eps", "layer_norm_epsilon", "rope_theta", "initializer_range", "midpoint_a_floor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}={v!r} must be a finite number > 0")
        for name in ("exact_reversal", "drift_monitor", "drift_fallback", "attention_bias", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):  # "false" would read as True
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.memory_free is not None and not isinstance(self.memory_free, bool):
            raise ValueError(f"memory_free={self.memory_free!r} must be true, false or null (the rule's default)")
        w = self.attention_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise ValueError(f"attention_window={w!r} must be None (full attention) or a positive integer")
        FAMILIES[self.block].check(self)

    def _check_stored_layers(self):
        s, n = self.stored_layers, self.num_hidden_layers
        if s is None:
            return
        if not isinstance(s, (list, tuple)) or any(not isinstance(v, int) or isinstance(v, bool) for v in s):
            raise ValueError(f"stored_layers={s!r} must be a list of layer indices")
        bad = [v for v in s if not 0 <= v < n]
        if bad:
            raise ValueError(f"stored_layers names layer {bad[0]}, but the model's layers are 0..{n - 1}")
        if len(set(s)) != len(s):
            raise ValueError(f"stored_layers={list(s)} names a layer twice")
        self.stored_layers = sorted(s) or None

    def _check_exact(self, rule):
        b = self.exact_fraction_bits
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 56:
            raise ValueError(f"exact_fraction_bits={b!r} must be an integer in [1, 56]")
        k = self.midpoint_a_dyadic_bits
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16):
            raise ValueError(f"midpoint_a_dyadic_bits={k!r} must be None or an integer in [1, 16]")
        if self.exact_reversal and not rule.reversible:
            raise ValueError(f"exact_reversal=True needs a reversible dynamics; {self.dynamics!r} is not")
        t = self.drift_threshold
        if t is not None and not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            raise ValueError(f"drift_threshold={t!r} must be None or a finite number > 0")
        if self.drift_fallback and not self.drift_monitor:
            raise ValueError(
                "drift_fallback=True needs drift_monitor=True: it falls back to the states the monitor stores"
            )
        if self.drift_fallback and t is None:
            raise ValueError("drift_fallback=True needs a drift_threshold to decide when to fall back")

    def _check_midpoint_a(self):
        a = self.midpoint_a
        if isinstance(a, (list, tuple)) and len(a) != self.num_hidden_layers:
            raise ValueError(
                f"midpoint_a has {len(a)} values; it needs one per layer (num_hidden_layers={self.num_hidden_layers})"
            )
        if a is not None and not isinstance(a, (int, float, list, tuple)):
            raise ValueError(f"midpoint_a={a!r} must be None (random draw), a number, or a per-layer list")
        for j, v in enumerate(draw_midpoint_a(self)):
            if self.exact_reversal:  # exact division by a: no floor, but a must be a nonzero dyadic
                if v == 0 or fxp.dyadic(v) is None:
                    raise ValueError(
                        f"midpoint_a[{j}]={v!r} is not a nonzero dyadic m/2^k (k <= {fxp.MAX_DYADIC_BITS}), "
                        f"which exact_reversal needs; nearest dyadic: {fxp.nearest_dyadic(v, 4)} with k=4, "
                        f"{fxp.nearest_dyadic(v, fxp.MAX_DYADIC_BITS)} with k={fxp.MAX_DYADIC_BITS} "
                        f"(or set midpoint_a_dyadic_bits for the random draw)"
                    )
                continue
            if not math.isfinite(v) or abs(v) < self.midpoint_a_floor:
                raise ValueError(
                    f"midpoint_a[{j}]={v:g} is below midpoint_a_floor={self.midpoint_a_floor:g}: float "
                    f"reconstruction divides by a and amplifies error by 1/|a| per layer; use exact "
                    f"reversal (exact_reversal=True) or a larger |a|"
                )
