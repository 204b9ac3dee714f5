"""Llama family (Llama, SmolLM2, TinyLlama; Qwen2 and Mistral convert into it): the residual branch f(x).

    f(x) = a + MLP(post_attention_layernorm(x + a)),   a = Attn(input_layernorm(x))   (eq. 2.5)

RMSNorm, rotary position embeddings (HF's rotate-half layout), grouped-query attention, SwiGLU MLP.
No ``x + ...`` here: the dynamics own the residual update. Keys match LlamaForCausalLM /
Qwen2ForCausalLM exactly (``model.layers.{i}.self_attn.q_proj.weight`` ...).
Shape legend: B batch, T tokens, D width, H heads, G kv heads, K head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RevLLMError
from .attention import sdpa
from .spec import FamilySpec, HFSource


class LlamaRMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        # Normalize in at least fp32 (as HF does for bf16/fp16/fp32): bf16 variance loses too much
        # precision; a float64 model stays float64 (the tight reference checks need it).
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, K = config.hidden_size, config.head_dim
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, K
        qkv_bias = bool(config.attention_bias or config.qkv_bias)
        self.q_proj = nn.Linear(d, self.n_head * K, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * K, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * K, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * K, d, bias=bool(config.attention_bias))
        self.o_proj.residual_out = True  # init std / sqrt(2L), as GPT-2
        self.dropout = config.dropout
        self.attn_fn = sdpa

    def forward(self, x, position_embeddings, attention_mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, K)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, K)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings  # (B, 1, T, K)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v)
        p = self.dropout if self.training else 0.0
        y = self.attn_fn(q, k, v, attention_mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return F.dropout(self.o_proj(y), p, self.training)


class LlamaMLP(nn.Module):
    act = staticmethod(F.silu)  # SwiGLU; a gated family with another activation overrides this

    def __init__(self, config):
        super().__init__()
        d, m = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)
        self.down_proj.residual_out = True
        self.dropout = config.dropout

    def forward(self, x):
        y = self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return F.dropout(y, self.dropout, self.training)


class LlamaBlock(nn.Module):
    """Residual branch of one Llama layer. Returns f(x), or its 'attn' / 'mlp' half."""

    norm_cls, mlp_cls = LlamaRMSNorm, LlamaMLP  # a family sharing this layout swaps its own in

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = self.norm_cls(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = self.norm_cls(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.mlp_cls(config)

    def forward(self, x, part="full", attention_mask=None, position_embeddings=None, cache=None):
        if part == "attn":
            return self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, cache)
        if part == "mlp":
            return self.mlp(self.post_attention_layernorm(x))
        a = self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, cache)
        return a + self.mlp(self.post_attention_layernorm(x + a))


class LlamaRotaryEmbedding(nn.Module):
    """RoPE tables. The inverse frequencies are recomputed per call (K/2 numbers) rather than kept as
    a non-persistent buffer, which meta-device loading would leave uninitialized."""

    def __init__(self, config):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta

    @torch.no_grad()
    def forward(self, position_ids, dtype):
        K = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, K, 2, device=position_ids.device).float() / K))
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, K/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, K)


class LlamaBackbone(nn.Module):
    """``embed_tokens``, the ``layers``, the final ``norm``, and the rotary table: HF names."""

    embedding_cls, block_cls, norm_cls = nn.Embedding, LlamaBlock, LlamaRMSNorm

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = self.embedding_cls(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.block_cls(config) for _ in range(config.num_hidden_layers))
        self.norm = self.norm_cls(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.embed_drop = nn.Dropout(config.dropout)

    @property
    def final_norm(self):
        return self.norm

    def embed(self, input_ids=None, position_ids=None, inputs_embeds=None):
        """Token embeddings plus the rotary tables every block needs."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        # cos/sin in fp32 (as in the streams); autocast casts q, k around them as it would in HF.
        cos_sin = self.rotary_emb(position_ids, torch.float32 if x.dtype != torch.float64 else x.dtype)
        return self.embed_drop(x), {"position_embeddings": cos_sin}


def rope_theta(c) -> float:
    """The RoPE base of an HF config; refuses RoPE scaling, which the rotary table does not apply."""
    rp = getattr(c, "rope_parameters", None) or {}
    rope_type = rp.get("rope_type", "default")
    if rope_type != "default":
        raise RevLLMError(f"rope_type={rope_type!r} (RoPE scaling) is not supported; only plain RoPE is")
    return float(rp.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def translate(c, block: str = "llama", activations: tuple[str, ...] = ("silu",)) -> dict:
    """RevLLMConfig fields of a Llama-layout HF config (also the base of Qwen2, Mistral, Gemma)."""
    if c.hidden_act not in activations:
        raise RevLLMError(
            f"hidden_act={c.hidden_act!r} is not supported for block={block!r} "
            f"(the gated MLP implements {', '.join(activations)})"
        )
    if getattr(c, "mlp_bias", False):
        raise RevLLMError("mlp_bias=True is not supported")
    return dict(
        block=block,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        hidden_act=c.hidden_act,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=rope_theta(c),
        attention_bias=bool(getattr(c, "attention_bias", False)),
    )


SPEC = FamilySpec(
    name="llama",
    backbone=LlamaBackbone,
    block=LlamaBlock,
    embedding="embed_tokens",
    norms=(LlamaRMSNorm,),
    activations=("silu",),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
)
HF = HFSource("llama", "LlamaForCausalLM", "llama", "model.", translate, skip=("rotary_emb.inv_freq",))
