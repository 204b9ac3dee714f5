"""GPT-2 family: the residual branch f(x) of GPT2LMHeadModel's block, with HF parameter names.

    f(x) = a + MLP(ln_2(x + a)),   a = Attn(ln_1(x))          (eq. 2.5)

Unlike HF's GPT2Block there is no ``x + ...``: the dynamics own the residual update. Weights use
HF's Conv1D layout ((in, out) matrices), so a GPT-2 checkpoint loads key for key, the backbone prefix
``transformer.`` becoming ``model.``. ``part`` selects the whole branch or its attention/MLP half
(the Hamiltonian rule evaluates them separately).
Shape legend: B batch, T tokens, D width, H heads, K head dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import RevLLMError
from .attention import sdpa
from .spec import FamilySpec, HFSource


class GPT2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.n_head, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.c_proj.residual_out = True  # init std / sqrt(2L), as GPT-2
        self.dropout = config.dropout
        self.attn_fn = sdpa

    def forward(self, x, attention_mask=None, cache=None):
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, K)
        if cache is not None:
            k, v = cache.update(k, v)
        p = self.dropout if self.training else 0.0
        y = self.attn_fn(q, k, v, attention_mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, D)
        return F.dropout(self.c_proj(y), p, self.training)


class GPT2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Conv1D(config.intermediate_size, config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.intermediate_size)
        self.c_proj.residual_out = True
        self.dropout = config.dropout
        self.approximate = "tanh" if config.hidden_act in ("gelu_new", "gelu_pytorch_tanh") else "none"

    def forward(self, x):
        h = F.gelu(self.c_fc(x), approximate=self.approximate)
        return F.dropout(self.c_proj(h), self.dropout, self.training)


class GPT2Block(nn.Module):
    """Residual branch of one GPT-2 layer. Returns f(x), or its 'attn' / 'mlp' half."""

    def __init__(self, config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x, part="full", attention_mask=None, position_embeddings=None, cache=None):
        if part == "attn":
            return self.attn(self.ln_1(x), attention_mask, cache)
        if part == "mlp":
            return self.mlp(self.ln_2(x))
        a = self.attn(self.ln_1(x), attention_mask, cache)
        return a + self.mlp(self.ln_2(x + a))


class GPT2Backbone(nn.Module):
    """Embeddings (wte + wpe), the layers ``h``, and the final norm ``ln_f``: HF names."""

    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    @property
    def layers(self):
        return self.h

    @property
    def final_norm(self):
        return self.ln_f

    @property
    def embed_tokens(self):
        return self.wte

    def embed(self, input_ids=None, position_ids=None, inputs_embeds=None):
        """Token + position embeddings. Returns (hidden (B, T, D), extra block kwargs)."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids.max() >= self.wpe.num_embeddings:
            raise ValueError(
                f"sequence position {int(position_ids.max())} exceeds max_position_embeddings={self.wpe.num_embeddings}"
            )
        return self.drop(x + self.wpe(position_ids)), {}


ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


def translate(c) -> dict:
    """RevLLMConfig fields of a GPT2Config; refuses the options the block does not compute."""
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(c, flag, False):
            raise RevLLMError(f"GPT-2 option {flag}=True is not supported")
    if not getattr(c, "scale_attn_weights", True):
        raise RevLLMError("GPT-2 option scale_attn_weights=False is not supported")
    if c.activation_function not in ACTIVATIONS:
        raise RevLLMError(f"GPT-2 activation_function={c.activation_function!r} is not supported")
    return dict(
        block="gpt2",
        hidden_size=c.n_embd,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        intermediate_size=c.n_inner or 4 * c.n_embd,
        max_position_embeddings=c.n_positions,
        hidden_act=c.activation_function,
        layer_norm_epsilon=c.layer_norm_epsilon,
    )


SPEC = FamilySpec(
    name="gpt2",
    backbone=GPT2Backbone,
    block=GPT2Block,
    embedding="wte",
    norms=(nn.LayerNorm,),
    activations=ACTIVATIONS,
    lora_targets=("c_attn", "attn.c_proj"),
    lora_fan_in_fan_out=True,
    grouped_kv=False,
    free_head_dim=False,
)
# Some transformers versions persist GPT-2's causal 'bias' table: a buffer, not a weight.
HF = HFSource("gpt2", "GPT2LMHeadModel", "gpt2", "transformer.", translate, skip=(".attn.bias", ".attn.masked_bias"))
