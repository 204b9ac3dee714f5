"""GGUF conversion: a tiny Llama written to a .gguf file here with the ``gguf`` package (llama.cpp's
tensor names and its q/k row permutation, F32), converted with ``revllm.convert.convert``: the
euler conversion reproduces the source model's logits, every weight lands (untied head included)."""

import numpy as np
import pytest
import torch
from hf_tiny import tiny_hf

gguf = pytest.importorskip("gguf", reason="the convert extra (pip install revllm[convert]) is not installed")


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutes q/k rows for its RoPE layout; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(src, path):
    c = src.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, t in src.state_dict().items():
        a = t.float().numpy()
        if key.endswith("q_proj.weight"):
            a = _permute(a, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            a = _permute(a, c.num_key_value_heads)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_converts_to_the_same_function(tmp_path):
    from revllm.convert import convert

    src = tiny_hf("llama", layers=2, dtype=torch.float32, tie=False)
    path = write_gguf(src, tmp_path / "tiny.gguf")
    rev = convert(path, dynamics="euler", initial_state="copy")
    assert rev.config.num_hidden_layers == 2 and rev.config.num_key_value_heads == 2
    assert not rev.config.tie_word_embeddings
    sd = rev.state_dict()
    for k, v in src.state_dict().items():  # every weight, key for key, bit for bit (F32 in, F32 out)
        assert torch.equal(sd[k], v), k
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (rev(ids).logits - src(ids).logits).abs().max() <= 1e-5
    # `revllm eval/generate` name a .gguf directly: load_model reads it with transformers' loader
    from revllm.io import load_model

    plain = load_model(path)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in src.state_dict().items())
    # and the default near-Euler conversion of the same file runs (exact, memory-free)
    near = convert(path)
    assert near.config.dynamics == "midpoint_a" and near.config.exact_reversal


def test_missing_gguf_file_is_refused(tmp_path):
    from revllm.io import load_source

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(tmp_path / "nope.gguf")
