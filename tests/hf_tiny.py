"""Tiny randomly initialized Hugging Face models of each supported architecture (built from configs, offline)."""

import torch
import transformers as t

FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gemma"]
# Llama-layout HF classes; Mistral's window (8) is shorter than the test sequences, so it matters.
_LLAMA_LAYOUT = {
    "llama": (t.LlamaForCausalLM, t.LlamaConfig, {}),
    "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config, {}),
    "mistral": (t.MistralForCausalLM, t.MistralConfig, {"sliding_window": 8}),
    "gemma": (t.GemmaForCausalLM, t.GemmaConfig, {"head_dim": 8}),
}


def tiny_hf(family: str, layers: int = 3, seed: int = 0, dtype=torch.float64, tie: bool | None = None, **extra):
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = t.GPT2Config(
            n_embd=32,
            n_layer=layers,
            n_head=4,
            vocab_size=97,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = t.GPT2LMHeadModel(cfg)
    else:
        kw = dict(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=97,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        )
        if tie is not None:
            kw["tie_word_embeddings"] = tie
        cls, cfg_cls, own = _LLAMA_LAYOUT[family]
        model = cls(cfg_cls(**{**kw, **own, **extra}))
        with torch.no_grad():
            if family == "qwen2":  # HF zero-inits the q/k/v biases; randomize them so the copy is tested
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.1)
            if family == "gemma":  # HF zero-inits the (1 + w) norm weights; randomize them likewise
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.normal_(0, 0.1)
    return model.to(dtype).eval()


def norms_keep_dtype(model):
    """Make the RMSNorms of an HF Llama-layout model compute in the model's dtype.

    HF's RMSNorms cast to fp32 even in a float64 model, so a float64 HF model is fp32-accurate only;
    revllm's norms keep float64. This restates each HF norm's formula without the cast (on the
    instances, not the classes), so a float64 comparison shows the rest of the model to ~1e-15."""
    import types

    def llama_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gemma_norm(self, x):  # GemmaRMSNorm: (x / rms(x)) * (1 + w), its eps is ``eps``
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)

    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(gemma_norm if hasattr(m, "eps") else llama_norm, m)
    return model
