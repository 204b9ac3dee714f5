"""Conversion of tiny random GPT-2 / Llama / Qwen2 HF models: weights, logits, gradients, save/load."""
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import revllm
from revllm.convert import convert, save_converted
from revllm.errors import RevLLMError

from hf_tiny import FAMILIES, tiny_hf

RETROFIT = ["midpoint", "leapfrog", "hamiltonian"]


def _ids(B=2, T=20, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_weight_lands(family):
    src = tiny_hf(family)
    rev = convert(src, dynamics="midpoint", dtype=torch.float64)
    ref = src.state_dict()
    prefix = "transformer." if family == "gpt2" else "model."
    rsd = rev.state_dict()
    for key, t in ref.items():
        rkey = "model." + key[len(prefix):] if key.startswith(prefix) else key
        assert rkey in rsd, rkey
        assert torch.equal(rsd[rkey], t), rkey
    extra = set(rsd) - {("model." + k[len(prefix):]) if k.startswith(prefix) else k for k in ref}
    assert extra <= {"lm_head.weight"}  # tied head
    if family == "qwen2":
        assert rev.config.qkv_bias and rev.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_euler_reproduces_original_logits(family):
    src = tiny_hf(family)
    ids = _ids()
    rev = convert(src, dynamics="euler", dtype=torch.float64)
    with torch.no_grad():
        assert (rev(ids).logits - src(ids).logits).abs().max() < 1e-10
    src32, rev32 = src.float(), convert(src.float(), dynamics="euler")
    with torch.no_grad():
        assert (rev32(ids).logits - src32(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llama"])
def test_untied_head_is_copied(family):
    src = tiny_hf(family, tie=False)
    rev = convert(src, dynamics="euler", dtype=torch.float64)
    assert not rev.config.tie_word_embeddings
    assert torch.equal(rev.lm_head.weight, src.lm_head.weight)
    assert rev.lm_head.weight.data_ptr() != rev.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dynamics", RETROFIT)
def test_retrofit_memory_free_grads_match_stored(family, dynamics):
    src = tiny_hf(family)
    ids = _ids()
    grads = {}
    for mf in (True, False):
        rev = convert(src, dynamics=dynamics, dtype=torch.float64, memory_free=mf).train()
        rev(ids, labels=ids).loss.backward()
        grads[mf] = {n: p.grad.clone() for n, p in rev.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-9, atol=1e-11, msg=n)


def test_fixed_point_start_makes_midpoint_first_layer_residual():
    # midpoint with h=1 and p_{-1} = p_0 - f_0(p_0): p_1 = p_{-1} + 2 f_0(p_0) = p_0 + f_0(p_0).
    src = tiny_hf("llama", layers=1)
    ids = _ids()
    rev = convert(src, dynamics="midpoint", dtype=torch.float64)
    with torch.no_grad():
        assert (rev(ids).logits - src(ids).logits).abs().max() < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_near_euler_k8_within_one_percent_of_original_loss(family):
    src = tiny_hf(family, layers=4)
    ids = _ids(B=4, T=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rev = convert(src, dynamics="midpoint_a", k=8, dtype=torch.float64)
    assert rev.config.midpoint_a == 2.0**-8
    with torch.no_grad():
        l0, l1 = src(ids, labels=ids).loss.item(), rev(ids, labels=ids).loss.item()
    assert abs(l1 - l0) / l0 < 0.01


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(tmp_path, family):
    src = tiny_hf(family)
    rev = convert(src, dynamics="leapfrog", dtype=torch.float64)
    out = save_converted(rev, tmp_path / "conv")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    assert isinstance(back, revllm.RevLLMForCausalLM)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, rev(ids).logits)
    assert back.generation_config.eos_token_id == src.generation_config.eos_token_id
    with pytest.raises(RevLLMError, match="not empty"):
        save_converted(rev, out)


def test_hf_directory_source_and_tokenizer_copied(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    src = tiny_hf("llama", dtype=torch.float32)
    src.save_pretrained(tmp_path / "hf")
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0").save_pretrained(tmp_path / "hf")
    from revllm.cli import main as cli_main

    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--dynamics", "euler"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        ids = _ids()
        assert (back(ids).logits - src(ids).logits).abs().max() < 1e-5


def test_unsupported_architecture_lists_supported(tmp_path):
    import transformers as t

    bert = t.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(RevLLMError, match="supported: GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        convert(t.BertForMaskedLM(bert))
    bert.save_pretrained(tmp_path)
    with pytest.raises(RevLLMError, match="unsupported architecture 'bert'"):
        convert(tmp_path)


def test_cli_bad_source_is_one_line_error(tmp_path, capsys):
    from revllm.cli import main

    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a model directory nor a .gguf file" in err
