"""Block families as specs: every HF architecture converts through its spec, Mistral and Gemma included."""

import ast
import pathlib

import pytest
import torch
from hf_tiny import FAMILIES, norms_keep_dtype, tiny_hf

from revllm.blocks import FAMILIES as SPECS
from revllm.blocks import HF_SOURCES
from revllm.convert import convert
from revllm.errors import RevLLMError


def _ids(B=2, T=20, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def test_every_tested_architecture_is_registered():
    assert set(FAMILIES) == set(HF_SOURCES)
    assert {s.family for s in HF_SOURCES.values()} == set(SPECS)


@pytest.mark.parametrize("family", FAMILIES)
def test_euler_reproduces_hf_logits_in_float64(family):
    """Within 1e-10 in float64 (HF's norms restated without their fp32 cast, see ``norms_keep_dtype``),
    with and without left padding."""
    src = tiny_hf(family)
    rev = convert(src, dynamics="euler", dtype=torch.float64)
    norms_keep_dtype(src)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        assert (rev(ids).logits - src(ids).logits).abs().max() < 1e-10
        diff = (rev(ids, attention_mask=mask).logits - src(ids, attention_mask=mask).logits)[:, 5:]
        assert diff.abs().max() < 1e-10


def test_mistral_sliding_window_is_applied():
    """The window (8 < 20 tokens) changes HF's logits, and the conversion follows it exactly."""
    ids = _ids()
    windowed, full = norms_keep_dtype(tiny_hf("mistral")), norms_keep_dtype(tiny_hf("mistral", sliding_window=None))
    rev = convert(windowed, dynamics="euler", dtype=torch.float64)
    assert rev.config.attention_window == 8
    with torch.no_grad():
        assert (windowed(ids).logits - full(ids).logits).abs().max() > 1e-3
        assert (rev(ids).logits - windowed(ids).logits).abs().max() < 1e-10
        assert (convert(full, dynamics="euler", dtype=torch.float64)(ids).logits - full(ids).logits).abs().max() < 1e-10


@pytest.mark.parametrize("family", ["mistral", "gemma"])
def test_generation_beyond_the_window_matches_hf(family):
    """Greedy decoding with the KV cache (20 tokens past Mistral's window of 8) gives HF's tokens."""
    src = tiny_hf(family)
    rev = convert(src, dynamics="euler", dtype=torch.float64)
    ids = _ids(B=1, T=6)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(rev.generate(ids, **kw), norms_keep_dtype(src).generate(ids, **kw))


@pytest.mark.parametrize("family", ["mistral", "gemma"])
@pytest.mark.parametrize("dynamics", ["midpoint", "hamiltonian", "midpoint_a"])
def test_memory_free_gradients_equal_stored(family, dynamics):
    """midpoint_a here is the near-Euler default: exact streams, so the gradients agree bit for bit."""
    src, ids = tiny_hf(family), _ids()
    grads = {}
    for mf in (True, False):
        rev = convert(src, dynamics=dynamics, dtype=torch.float64, memory_free=mf).train()
        rev(ids, labels=ids).loss.backward()
        grads[mf] = {n: p.grad for n, p in rev.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == len(list(rev.parameters()))
    for n, g in grads[True].items():
        if dynamics == "midpoint_a":
            assert torch.equal(g, grads[False][n]), n
        else:
            torch.testing.assert_close(g, grads[False][n], rtol=1e-9, atol=1e-11, msg=n)


def test_gemma_parts_are_gemma_s():
    """GeGLU, (1 + w) norms initialized to 0 (so a fresh model's norms are the identity scale), and the
    sqrt(D) embedding scale, rounded through fp32 as HF's buffer is."""
    import revllm

    cfg = revllm.RevLLMConfig(
        block="gemma",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=97,
    )
    model = revllm.RevLLMForCausalLM(cfg)
    assert cfg.hidden_act == "gelu_pytorch_tanh"
    norms = [m for m in model.modules() if type(m).__name__ == "GemmaRMSNorm"]
    assert len(norms) == 5 and all(torch.equal(m.weight, torch.zeros(32)) for m in norms)
    ids = _ids(B=1, T=3)
    emb = model.model.embed_tokens
    torch.testing.assert_close(emb(ids), emb.weight[ids] * 32**0.5, rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="hidden_act='silu' is not implemented for block='gemma'"):
        revllm.RevLLMConfig(block="gemma", hidden_act="silu")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_come_from_the_spec(family):
    from revllm.convert.finetune import add_lora

    rev = convert(tiny_hf(family), dynamics="midpoint", dtype=torch.float64)
    peft = add_lora(rev, r=2)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    spec = SPECS[rev.config.block]
    assert wrapped == {t.rsplit(".", 1)[-1] for t in spec.lora_targets}


@pytest.mark.parametrize("case", ["gemma_bidirectional", "gemma_act", "qwen2_window"])
def test_refusals_are_one_line_errors(case):
    import transformers as t

    kw = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=97,
    )
    cfg, msg = {
        "gemma_bidirectional": (
            t.GemmaConfig(**kw, head_dim=8, use_bidirectional_attention=True),
            "use_bidirectional_attention=True",
        ),
        "gemma_act": (t.GemmaConfig(**kw, head_dim=8, hidden_act="silu"), "hidden_act='silu' is not supported"),
        "qwen2_window": (t.Qwen2Config(**kw, use_sliding_window=True, sliding_window=8), "sliding-window"),
    }[case]
    from revllm.convert.from_hf import translate_config

    with pytest.raises(RevLLMError, match=msg) as e:
        translate_config(cfg, dynamics="euler")
    assert "\n" not in str(e.value)


def test_unsupported_architecture_lists_every_source():
    import transformers as t

    from revllm.convert.from_hf import translate_config

    with pytest.raises(RevLLMError, match="supported: .*MistralForCausalLM \\(mistral\\).*GemmaForCausalLM"):
        translate_config(t.PhiConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=97))


# Code that must read the specs instead of naming a family.
_SPEC_READERS = [
    "modeling/configuration_revllm.py",
    "modeling/modeling_revllm.py",
    "convert/from_hf.py",
    "convert/finetune.py",
]


@pytest.mark.parametrize("path", _SPEC_READERS)
def test_no_switch_on_family_names(path):
    """No comparison (==, !=, in) against a family name or HF model_type outside ``revllm/blocks``."""
    names = set(SPECS) | set(HF_SOURCES)
    tree = ast.parse((pathlib.Path(__file__).parent.parent / "revllm" / path).read_text())
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                hits += [(node.lineno, c.value) for c in consts if isinstance(c, ast.Constant) and c.value in names]
    assert not hits, f"{path} switches on family names at {hits}"
