"""RevLLMForCausalLM: a Hugging Face causal LM whose layers are joined by a reversible dynamics.

Composition (style: the engine is applied to the model, not woven into it):
  * ``model``: the family backbone (embeddings, the residual branches f_j, the final norm), HF names;
  * ``dynamics``: the update rule between layers (and midpoint_a's coefficient buffer);
  * ``lm_head``: tied to the token embedding unless ``tie_word_embeddings=False``.

Every path is one call to the engine's ``run_stack``, which owns the layer loop: the reversible backward
(``memory_free``), the same arithmetic under ordinary autograd, per-layer activation checkpointing
(``Stack.checkpoint``), and inference with a KV cache (``Stack.layer_kwargs`` gives each layer its cache
slot; it takes the stored path, since reversibility is only needed for the backward).
Shape legend: B batch, T tokens, D width, V vocab.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D

from ..blocks import FAMILIES
from ..blocks.attention import build_mask
from ..dynamics import build_dynamics
from ..dynamics.midpoint import MidpointA, draw_midpoint_a
from ..engine import DriftMonitor, Stack, run_stack
from .configuration_revllm import RevLLMConfig
from .loss import chunked_causal_lm_loss

# One regex for all families' tied embeddings: only the family's own one exists in a given model.
_EMBEDDINGS = "|".join(sorted({spec.embedding for spec in FAMILIES.values()}))


class RevLLMPreTrainedModel(PreTrainedModel):
    config_class = RevLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = sorted({spec.block.__name__ for spec in FAMILIES.values()})
    _tied_weights_keys = {"lm_head.weight": rf"model\.({_EMBEDDINGS})\.weight"}

    def _init_weights(self, module):
        """Init table: Linear/Conv1D weights N(0, initializer_range), biases 0; embeddings
        N(0, initializer_range); the family's norms weight ``norm_weight`` (1, or 0 where a norm
        applies 1 + w), bias 0; each branch's output projection (c_proj, o_proj, down_proj)
        N(0, initializer_range / sqrt(2 L)) as in GPT-2, since L layers add into the streams;
        midpoint_a's ``a`` keeps its configured/seeded draw."""
        std = self.config.initializer_range
        spec = FAMILIES[self.config.block]
        if isinstance(module, (nn.Linear, Conv1D)):
            # The blocks mark their residual output projections: transformers initializes leaf modules
            # directly, so the scaling must be decided here, not in a parent's branch.
            scale = (2 * self.config.num_hidden_layers) ** -0.5 if getattr(module, "residual_out", False) else 1.0
            init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, spec.norms):
            init.constant_(module.weight, spec.norm_weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MidpointA):
            init.copy_(module.a, torch.tensor(draw_midpoint_a(self.config), dtype=module.a.dtype))
            module._a_cache = None


class RevLLMForCausalLM(RevLLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: RevLLMConfig):
        super().__init__(config)
        self.model = FAMILIES[config.block].backbone(config)
        self.dynamics = build_dynamics(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # per-layer checkpointing of the stored path (baseline (b))
        self.post_init()

    def get_input_embeddings(self):
        return getattr(self.model, FAMILIES[self.config.block].embedding)

    def set_input_embeddings(self, value):
        setattr(self.model, FAMILIES[self.config.block].embedding, value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # -- the stack ------------------------------------------------------------------------------
    def _initial_pair(self, p0, stack: Stack):
        """The two initial streams (older, newer). See RevLLMConfig.initial_state."""
        mode = self.config.initial_state
        a0 = self.dynamics.layer_coefficients(0)[0]
        if mode == "copy" or (not torch.is_tensor(a0) and a0 == 0):
            # A_0 = 0 (euler): the first step never reads the older stream, so do not build it.
            return p0, p0
        if mode == "zero":
            return torch.zeros_like(p0), p0
        # "fixed_point": p_{-1} = p_0 - h f_0(p_0), the residual update inverted to first order.
        # Evaluated under ordinary autograd (one layer's activations), with its own cache slot (index L).
        f0 = stack.f(self.model.layers[0], "full", p0, self.config.num_hidden_layers)
        return p0 - self.dynamics.h * f0.to(p0.dtype), p0

    def _fuse_initial_state(self, checkpointed: bool, preserve_rng: bool) -> bool:
        """Whether the engine builds the fixed-point initial state from layer 0's own evaluation.

        p_{-1} = p_0 - h f_0(p_0) and layer 0's step both evaluate f_0 at p_0: the engine reuses the one
        evaluation (forward and backward). Not for two-part rules (layer 0 evaluates a part, not f_0),
        under dropout (the two evaluations draw different masks), or with per-layer checkpointing (the
        checkpointed layer would have to return x_0 as well)."""
        a0 = self.dynamics.layer_coefficients(0)[0]
        return (
            self.config.initial_state == "fixed_point"
            and self.dynamics.parts == ("full",)
            and not checkpointed
            and not preserve_rng
            and (torch.is_tensor(a0) or a0 != 0)
        )

    def _resolve_cache(self, cache, past_key_values, use_cache):
        """(the KV cache to use or None, whether to return it). transformers >= 5.24 passes the cache as
        ``cache`` (``past_key_values`` before): accept both."""
        past_key_values = cache if cache is not None else past_key_values
        use_cache = bool(use_cache) and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if past_key_values is not None and not isinstance(past_key_values, DynamicCache):
            # A static cache pads keys to its full length, which the blocks' masks do not cover.
            raise ValueError(
                f"generation with a KV cache needs a DynamicCache (the default cache_implementation), "
                f"got {type(past_key_values).__name__}"
            )
        return past_key_values, use_cache

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        cache=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int = 0,
        return_dict=None,
        layer_loss=None,
        **kwargs,
    ):
        """``layer_loss(j, state) -> 0-d tensor``: an optional term on the newest stream after each layer j
        (e.g. matching a teacher's hidden states); its sum over layers is ``output.layer_loss`` and its
        gradient flows through the memory-free backward (see revllm.engine.function)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        B, T = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape
        device = (input_ids if input_ids is not None else inputs_embeds).device
        past_key_values, use_cache = self._resolve_cache(cache, past_key_values, use_cache)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
        if attention_mask is not None and attention_mask.shape[-1] < past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, need {past + T}")

        p0, block_kwargs = self.model.embed(input_ids, position_ids, inputs_embeds)
        window = self.config.attention_window
        block_kwargs["attention_mask"] = build_mask(attention_mask, T, past + T, device, window)
        caching = past_key_values is not None
        preserve_rng = self.training and self.config.dropout > 0
        exact_bits = self.config.exact_fraction_bits if self.config.exact_reversal else None
        stack = Stack(
            self.model.layers,
            self.dynamics,
            block_kwargs,
            preserve_rng,
            exact_bits,
            DriftMonitor.attach(self, self.config),
            layer_loss=layer_loss,
        )
        if caching:  # layer j's attention reads and extends cache slot j
            stack.layer_kwargs = _CacheView(past_key_values).slot
        # The reversible backward only pays off when a backward will run; the cache would be extended
        # twice by its recomputation, so a cached (inference) forward takes the stored path.
        memory_free = self.config.memory_free and torch.is_grad_enabled() and not caching
        if memory_free and self.gradient_checkpointing:
            warnings.warn("activation checkpointing is ignored: memory_free already stores no activations")
        if not memory_free and not caching and self.gradient_checkpointing and torch.is_grad_enabled():
            stack.checkpoint = self._gradient_checkpointing_func
        if layer_loss is not None and (caching or stack.checkpoint is not None):
            raise ValueError("layer_loss runs on the training path: not with a KV cache or activation checkpointing")
        if self._fuse_initial_state(stack.checkpoint is not None, preserve_rng):
            stack.initial_h = self.dynamics.h  # the engine builds x_0 from layer 0's own f_0(p_0)
            x0, y0 = None, p0
        else:
            if caching and self.config.initial_state == "fixed_point":
                _add_fixed_point_slot(past_key_values, self.config.num_hidden_layers)
            x0, y0 = self._initial_pair(p0, stack)
        _, yL, *layer_total = run_stack(x0, y0, stack, memory_free=memory_free)

        hidden = self.model.final_norm(yL)
        loss, logits = None, None
        if labels is not None:
            loss = chunked_causal_lm_loss(hidden, self.lm_head, labels, self.config.loss_chunk_size)
        # With labels and a backward ahead, full logits are not built: that is the memory the chunked
        # loss saves. Evaluation (no grad) and generation get logits as usual.
        if labels is None or not torch.is_grad_enabled():
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            logits = self.lm_head(hidden[:, keep])
        return RevLLMOutput(
            loss=loss,
            logits=logits,
            layer_loss=layer_total[0] if layer_loss is not None else None,
            **{_CACHE_FIELD: past_key_values if use_cache else None},
        )


@dataclass
class RevLLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus ``layer_loss``: the sum of a forward's per-layer terms (or None)."""

    layer_loss: torch.FloatTensor | None = None


# The output field holding the cache: ``cache`` in transformers >= 5.24, ``past_key_values`` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _add_fixed_point_slot(cache, num_layers: int) -> None:
    """initial_state="fixed_point" evaluates f_0 once more, at p_0, before the stack: that evaluation
    attends over its own keys/values, so it gets one extra cache slot after the L layers' slots."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) > num_layers:
        return
    while len(layers) <= num_layers:
        layers.append(DynamicLayer())


class _CacheView:
    """Adapts an HF Cache to the blocks' ``cache.update(k, v)``; one slot per layer."""

    def __init__(self, cache, idx: int | None = None):
        self.cache, self.idx = cache, idx

    def at(self, idx: int) -> _CacheView:
        return _CacheView(self.cache, idx)

    def slot(self, idx: int) -> dict:
        """The engine's per-layer kwargs (``Stack.layer_kwargs``): layer ``idx``'s cache view."""
        return {"cache": self.at(idx)}

    def update(self, k, v):
        return self.cache.update(k, v, self.idx)
