"""Tiny randomly initialized Hugging Face models of each supported family (built from configs, offline)."""
import torch
import transformers as t

FAMILIES = ["gpt2", "llama", "qwen2"]


def tiny_hf(family: str, layers: int = 3, seed: int = 0, dtype=torch.float64, tie: bool | None = None):
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = t.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=97, n_positions=64,
                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = t.GPT2LMHeadModel(cfg)
    else:
        kw = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=97, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
        if tie is not None:
            kw["tie_word_embeddings"] = tie
        cls, cfg_cls = (t.LlamaForCausalLM, t.LlamaConfig) if family == "llama" else (t.Qwen2ForCausalLM, t.Qwen2Config)
        model = cls(cfg_cls(**kw))
        if family == "qwen2":  # HF zero-inits the q/k/v biases; randomize them so the copy is tested
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.1)
    return model.to(dtype).eval()
