"""Gemma family: the Llama layer with GeGLU, Gemma's RMSNorm and a scaled token embedding, HF names.

    f(x) = a + MLP(post_attention_layernorm(x + a)),   a = Attn(input_layernorm(x))   (eq. 2.5)
    MLP(x) = down(gelu_tanh(gate(x)) * up(x))           (GeGLU)
    norm(x) = x / rms(x) * (1 + w)                      (w initialized to 0)
    embed(ids) = E[ids] * sqrt(D)

Keys match GemmaForCausalLM (``model.layers.{i}.mlp.gate_proj.weight`` ...); the head is tied.
Shape legend: B batch, T tokens, D width.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RevLLMError
from . import llama
from .spec import FamilySpec, HFSource


class GemmaRMSNorm(llama.LlamaRMSNorm):
    """x / rms(x) * (1 + w). Scaled in at least fp32 and cast back afterwards (HF's order, unlike
    Llama's cast-then-scale); a float64 model stays float64, like the Llama norm."""

    def __init__(self, d, eps):
        super().__init__(d, eps)
        with torch.no_grad():
            self.weight.zero_()  # 1 + w starts at 1

    def forward(self, x):
        work = torch.promote_types(x.dtype, torch.float32)
        h = x.to(work)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.to(work))).to(x.dtype)


class GemmaMLP(llama.LlamaMLP):
    act = staticmethod(partial(F.gelu, approximate="tanh"))  # GeGLU (HF's gelu_pytorch_tanh)


class GemmaBlock(llama.LlamaBlock):
    """Residual branch of one Gemma layer. Returns f(x), or its 'attn' / 'mlp' half."""

    norm_cls, mlp_cls = GemmaRMSNorm, GemmaMLP


class GemmaEmbedding(nn.Embedding):
    """Token embedding times sqrt(D). The factor is rounded to fp32 and then to the weight dtype, as
    HF's fp32 ``embed_scale`` buffer is (in bf16, sqrt(3072) = 55.43 becomes 55.5)."""

    def forward(self, ids):
        scale = torch.tensor(self.embedding_dim**0.5, dtype=torch.float32).to(self.weight.dtype)
        return super().forward(ids) * scale


class GemmaBackbone(llama.LlamaBackbone):
    embedding_cls, block_cls, norm_cls = GemmaEmbedding, GemmaBlock, GemmaRMSNorm


ACTIVATIONS = ("gelu_pytorch_tanh",)


def translate(c) -> dict:
    if getattr(c, "use_bidirectional_attention", False):
        raise RevLLMError("use_bidirectional_attention=True is not supported (causal attention only)")
    return llama.translate(c, block="gemma", activations=ACTIVATIONS)


SPEC = FamilySpec(
    name="gemma",
    backbone=GemmaBackbone,
    block=GemmaBlock,
    embedding="embed_tokens",
    norms=(GemmaRMSNorm,),
    norm_weight=0.0,
    activations=ACTIVATIONS,
    lora_targets=llama.SPEC.lora_targets,
)
HF = HFSource("gemma", "GemmaForCausalLM", "gemma", "model.", translate, skip=("rotary_emb.inv_freq",))
