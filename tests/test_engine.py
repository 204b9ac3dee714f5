"""The reversible engine against ordinary autograd on the same model (float64, tight tolerances)."""

import pytest
import torch
from conftest import FAMILIES, REVERSIBLE, tiny_model

from revllm.memory import SavedBytes


def _grads(model, ids, memory_free, seed):
    model.config.memory_free = memory_free
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    torch.manual_seed(seed)  # same dropout masks in both runs
    loss = model(inputs_embeds=emb, labels=ids).loss
    loss.backward()
    return loss.detach(), emb.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("layers", [1, 2, 5])
@pytest.mark.parametrize("block", FAMILIES)
@pytest.mark.parametrize("dynamics", REVERSIBLE)
def test_memory_free_gradients_match_stored(dynamics, block, layers, dropout):
    model = tiny_model(block=block, dynamics=dynamics, layers=layers, dropout=dropout, dtype=torch.float64)
    model.train()
    ids = torch.randint(0, 97, (2, 12))
    loss_s, emb_s, g_s = _grads(model, ids, False, seed=1)
    loss_m, emb_m, g_m = _grads(model, ids, True, seed=1)
    assert _rel(loss_m, loss_s) <= 1e-10
    assert _rel(emb_m, emb_s) <= 1e-10
    assert g_m.keys() == g_s.keys() and len(g_s) == len(list(model.parameters()))
    for name in g_s:
        assert _rel(g_m[name], g_s[name]) <= 1e-10, name
    if dropout:  # dropout is really active: a different seed changes the loss
        other, _, _ = _grads(model, ids, True, seed=2)
        assert other != loss_m


def _saved_bytes(model, ids):
    with SavedBytes(model) as meter:  # the project's one meter: unique storages, weights excluded
        loss = model(ids, labels=ids).loss
    loss.backward()
    return meter.bytes


@pytest.mark.parametrize("dynamics", REVERSIBLE)
def test_saved_bytes_do_not_grow_with_depth(dynamics):
    ids = torch.randint(0, 97, (2, 32))
    sizes = {}
    for mf in (True, False):
        for layers in (3, 24):
            m = tiny_model(dynamics=dynamics, layers=layers, memory_free=mf)
            sizes[mf, layers] = _saved_bytes(m, ids)
    assert sizes[True, 24] <= 1.05 * sizes[True, 3]
    # Stored mode grows linearly: 21 more layers cost ~7x the 3-layer stack.
    per_layer = (sizes[False, 24] - sizes[False, 3]) / 21
    assert per_layer > 0.5 * sizes[False, 3] / 3
    assert sizes[False, 24] > 3 * sizes[True, 24]


@pytest.mark.parametrize("block", FAMILIES)
@pytest.mark.parametrize("dynamics", REVERSIBLE)
def test_forward_then_inverse_returns_inputs(dynamics, block):
    model = tiny_model(block=block, dynamics=dynamics, layers=6, dtype=torch.float64).eval()
    ids = torch.randint(0, 97, (2, 10))
    p0, kw = model.model.embed(ids, torch.arange(10).expand(2, 10))
    dyn = model.dynamics
    x, y = torch.randn_like(p0), p0
    steps = [(j, b, part) for j, b in enumerate(model.model.layers) for part in dyn.parts]
    with torch.no_grad():
        a, b = x, y
        for j, blk, part in steps:
            a, b = b, dyn.step(j, a, b, blk(b, part=part, **kw))
        for j, blk, part in reversed(steps):
            a, b = dyn.inverse(j, a, b, blk(a, part=part, **kw)), a
    assert torch.allclose(a, x, rtol=0, atol=1e-12) and torch.allclose(b, y, rtol=0, atol=1e-12)


def test_frozen_parameters_get_no_gradient_and_inputs_without_grad():
    model = tiny_model(dynamics="midpoint", layers=3)
    for n, p in model.named_parameters():
        p.requires_grad_("mlp" in n)  # frozen embeddings: the streams need no grad
    ids = torch.randint(0, 97, (2, 12))
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("mlp" in n), n
    mlp_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.config.memory_free = False
    model(ids, labels=ids).loss.backward()
    for n, g in mlp_grads.items():
        assert torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_bf16_autocast_keeps_streams_fp32_and_matches_stored(half):
    """Also fp16: the engine replays the caller's autocast dtype, not the device's default one."""
    model = tiny_model(dynamics="leapfrog", layers=4)
    ids = torch.randint(0, 97, (2, 16))
    seen = []
    orig = model.dynamics.step

    def spy(j, x, y, fy):
        z = orig(j, x, y, fy)
        seen.append((fy.dtype, z.dtype))
        return z

    model.dynamics.step = spy
    grads = {}
    for mf in (False, True):
        model.config.memory_free = mf
        model.zero_grad()
        with torch.autocast("cpu", dtype=half):
            loss = model(ids, labels=ids).loss
        loss.backward()
        grads[mf] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (half, torch.float32) in seen and all(z == torch.float32 for _, z in seen)
    # The backward replays the forward's autocast on fp32 streams, so it recomputes the very bf16 block
    # outputs: observed 2e-7 relative (fp32 reconstruction). A backward without the autocast, or bf16
    # streams, differs by bf16 rounding (~5e-3, as bf16 vs fp32 gradients do); cosine > 0.99 admitted 14%.
    # fp16: observed 8e-5; the engine under the device default (bf16) instead of the caller's fp16: 4e-3.
    rel = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    assert rel <= (1e-5 if half == torch.bfloat16 else 1e-3)


def test_sdpa_matches_eager_attention():
    from revllm.blocks.attention import build_mask, eager, sdpa

    q = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.randn(2, 2, 7, 8, dtype=torch.float64)
    assert torch.allclose(sdpa(q, k, v), eager(q, k, v), atol=1e-12)
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    mask = build_mask(am, 7, 7, "cpu")
    assert torch.allclose(sdpa(q, k, v, mask), eager(q, k, v, mask), atol=1e-12)


def test_activation_checkpointing_matches_stored():
    model = tiny_model(dynamics="euler", layers=3)
    ids = torch.randint(0, 97, (2, 12))
    model(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model.train()
    model(ids, labels=ids).loss.backward()
    for r, p in zip(ref, model.parameters()):
        assert torch.allclose(r, p.grad, atol=1e-6)


def test_activation_checkpointing_in_exact_mode_says_it_runs_float_streams():
    model = tiny_model(dynamics="midpoint_a", midpoint_a=1 / 16, exact_reversal=True, memory_free=False).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 97, (2, 8))
    with pytest.warns(UserWarning, match="activation checkpointing runs float streams"):
        model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.model.layers.parameters())


def test_tensor_coefficients_and_double_backward():
    """A rule whose coefficients are 0-d tensors (documented as allowed) gets the same gradients as its
    float twin; create_graph through the reversible backward is refused instead of silently wrong."""
    from revllm.dynamics.leapfrog import Leapfrog

    class TensorLeapfrog(Leapfrog):
        def coefficients(self, j):
            return tuple(torch.tensor(c, dtype=torch.float64) for c in super().coefficients(j))

    grads = []
    for cls in (Leapfrog, TensorLeapfrog):
        model = tiny_model(dynamics="leapfrog", layers=3, dtype=torch.float64)
        model.dynamics.__class__ = cls
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(*grads))
    model = tiny_model(dynamics="leapfrog", layers=2, dtype=torch.float64)
    emb = model.get_input_embeddings()(torch.randint(0, 97, (1, 5))).detach().requires_grad_(True)
    loss = model(inputs_embeds=emb, labels=torch.randint(0, 97, (1, 5))).loss
    (g,) = torch.autograd.grad(loss, emb, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("mode", ["memory_free", "stored_exact", "per_layer_drift"])
def test_second_backward_with_retained_graph(mode):
    """retain_graph=True: the memory-free path serves a second backward (gradients accumulate to twice
    the first); paths that free per-layer state in the backward refuse it with a clear error."""
    kw = {"dynamics": "midpoint", "layers": 3, "dtype": torch.float64}
    if mode == "stored_exact":
        kw = {"dynamics": "midpoint_a", "midpoint_a": 1 / 16, "exact_reversal": True, "memory_free": False, "layers": 3}
    if mode == "per_layer_drift":
        kw["drift_monitor"] = True
    model = tiny_model(**kw)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    if mode != "memory_free":
        with pytest.raises(RuntimeError) as err:
            loss.backward()
        assert str(err.value) == (  # the whole message: it names the cause and the way out
            "reversible stack: backward through the same forward a second time is not supported in stored or "
            "per-layer-drift mode (its per-layer state was freed by the first backward, even with "
            "retain_graph=True); run the forward again"
        )
        return
    loss.backward()
    for f, p in zip(first, model.parameters()):
        assert torch.allclose(p.grad, 2 * f, rtol=1e-12, atol=1e-15)
