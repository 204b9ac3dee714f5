"""Issue 14, engine part: per-layer loss terms inside the memory-free backward, and stored (residual) layers.

Every path is checked against ordinary autograd on the same arithmetic (float64), or, in exact mode, against
the engine's stored reference bit for bit.
"""

import pytest
import torch
from conftest import FAMILIES, REVERSIBLE, tiny_model

from revllm.memory import SavedBytes


def _targets(layers, shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(layers)]


def _layer_loss(targets):
    # weights differ per layer, so a term read at the wrong layer would change the result
    return lambda j, z: (j + 1) * ((z - targets[j].to(z.dtype)) ** 2).mean()


def _grads(model, ids, memory_free, layer_loss):
    model.config.memory_free = memory_free
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=ids, layer_loss=layer_loss)
    (out.loss + 0.5 * out.layer_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.layer_loss.detach(), emb.grad, grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("stored", [None, [1], [0, 3]])
@pytest.mark.parametrize("block", FAMILIES)
@pytest.mark.parametrize("dynamics", REVERSIBLE)
def test_layer_terms_and_stored_layers_match_autograd(dynamics, block, stored):
    model = tiny_model(
        block=block, dynamics=dynamics, layers=4, dtype=torch.float64, stored_layers=stored, initial_state="fixed_point"
    )
    model.train()
    ids = torch.randint(0, 97, (2, 12))
    fn = _layer_loss(_targets(4, (2, 12, 32)))
    ref = _grads(model, ids, False, fn)
    got = _grads(model, ids, True, fn)
    assert _rel(got[0], ref[0]) <= 1e-12 and _rel(got[1], ref[1]) <= 1e-12
    assert _rel(got[2], ref[2]) <= 1e-10
    assert got[3].keys() == ref[3].keys() and len(ref[3]) == len(list(model.parameters()))
    for name in ref[3]:
        assert _rel(got[3][name], ref[3][name]) <= 1e-10, name


def test_layer_term_gradient_is_really_applied():
    """The layer terms change the gradients (a backward that ignored them would pass the test above only if
    the stored path ignored them too: check against a finite difference of the summed terms)."""
    model = tiny_model(dynamics="leapfrog", layers=3, dtype=torch.float64).train()
    ids = torch.randint(0, 97, (1, 8))
    fn = _layer_loss(_targets(3, (1, 8, 32)))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=emb, layer_loss=fn).layer_loss.backward()
    d = torch.randn_like(emb)
    eps = 1e-6
    with torch.no_grad():
        up = model(inputs_embeds=emb + eps * d, layer_loss=fn).layer_loss
        dn = model(inputs_embeds=emb - eps * d, layer_loss=fn).layer_loss
    fd = (up - dn) / (2 * eps)
    assert abs(fd.item() - (emb.grad * d).sum().item()) <= 1e-6 * max(1.0, abs(fd.item()))
    assert abs(fd.item()) > 1e-3  # not a vacuous zero


def test_stored_layers_are_the_residual_layers():
    """With every layer stored the model is the residual network: the same logits as dynamics='euler'."""
    ids = torch.randint(0, 97, (2, 10))
    ref = tiny_model(dynamics="euler", layers=3, dtype=torch.float64).eval()
    mixed = tiny_model(dynamics="midpoint", layers=3, dtype=torch.float64, stored_layers=[2, 0, 1]).eval()
    mixed.load_state_dict(ref.state_dict())
    assert mixed.config.stored_layers == [0, 1, 2]
    with torch.no_grad():
        assert torch.allclose(mixed(ids).logits, ref(ids).logits, atol=1e-12, rtol=0)
    # one stored layer: only that layer is residual, so the model differs from both pure rules
    one = tiny_model(dynamics="midpoint", layers=3, dtype=torch.float64, stored_layers=[1]).eval()
    pure = tiny_model(dynamics="midpoint", layers=3, dtype=torch.float64).eval()
    with torch.no_grad():
        assert not torch.allclose(one(ids).logits, pure(ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dynamics", ["midpoint", "midpoint_a"])
def test_exact_mode_stored_layers_and_terms_bitwise(dynamics, dtype):
    """Exact reversal with stored layers and layer terms: memory-free gradients equal the stored reference
    bit for bit (float64: the held states are decoded to the model's dtype, not float32, for the terms)."""
    extra = dict(midpoint_a=0.25) if dynamics == "midpoint_a" else {}
    model = tiny_model(
        dynamics=dynamics, layers=4, exact_reversal=True, stored_layers=[2], dtype=dtype, **extra
    ).train()
    ids = torch.randint(0, 97, (2, 12))
    fn = _layer_loss(_targets(4, (2, 12, 32)))
    ref = _grads(model, ids, False, fn)
    got = _grads(model, ids, True, fn)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert all(torch.equal(got[3][n], ref[3][n]) for n in ref[3])


def _saved(model, ids, fn):
    with SavedBytes(model) as meter:
        out = model(ids, labels=ids, layer_loss=fn)
    (out.loss + out.layer_loss).backward()
    return meter.bytes


@pytest.mark.parametrize("dynamics", ["midpoint", "leapfrog", "hamiltonian"])
def test_saved_bytes_flat_in_depth_plus_stored_layers(dynamics):
    """Layer terms add nothing per layer; each stored layer keeps one stream per substep, whatever the depth."""
    B, T, D = 2, 32, 32
    ids = torch.randint(0, 97, (B, T))
    stream = B * T * D * 4
    size = {}
    for layers in (3, 24):
        fn = _layer_loss(_targets(layers, (B, T, D)))
        for stored in (None, [2]):
            m = tiny_model(dynamics=dynamics, layers=layers, stored_layers=stored)
            size[layers, stored is not None] = _saved(m, ids, fn)
    assert size[24, False] <= 1.05 * size[3, False]
    per_stored = len(tiny_model(dynamics=dynamics).dynamics.parts) * stream
    for layers in (3, 24):
        assert size[layers, True] - size[layers, False] == per_stored


def test_stored_layers_config_is_checked_and_saved(tmp_path):
    from revllm import RevLLMForCausalLM

    with pytest.raises(ValueError, match=r"names layer 4, but the model's layers are 0\.\.3"):
        tiny_model(layers=4, stored_layers=[1, 4])
    with pytest.raises(ValueError, match="twice"):
        tiny_model(layers=4, stored_layers=[1, 1])
    with pytest.raises(ValueError, match="list of layer indices"):
        tiny_model(layers=4, stored_layers="11")
    m = tiny_model(layers=4, stored_layers=[3, 1])
    m.save_pretrained(tmp_path / "m")
    back = RevLLMForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.stored_layers == [1, 3] and back.dynamics.stored_layers == {1, 3}
