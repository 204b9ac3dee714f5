"""Exact reversal: fixed-point streams make the memory-free backward bit-identical to the stored one."""

import logging
import math

import pytest
import torch
from conftest import FAMILIES, tiny_model

from revllm import RevLLMConfig
from revllm.dynamics import fixedpoint as fxp
from revllm.engine import Stack, run_stack

MIXED_A = [-0.75, 0.5, 1.25, -1.5, 1 / 16, -1 / 16]  # signs, scales, k = 1..4
EXACT = {
    "midpoint": {},
    "leapfrog": {},
    "hamiltonian": {},
    "midpoint_a": {"midpoint_a": MIXED_A * 4},
    "midpoint_a_1/16": {"midpoint_a": 1 / 16},
}
LAYERS = 24


def _model(dynamics, block="llama", layers=LAYERS, sharpen=4.0, **kw):
    name = dynamics.split("_1/")[0]
    model = tiny_model(block=block, dynamics=name, layers=layers, **{"exact_reversal": True, **EXACT[dynamics], **kw})
    with torch.no_grad():  # "sharpened" weights: every matrix x4, as trained weights are far from init
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(sharpen)
    return model


def _grads(model, ids, memory_free, bf16):
    model.config.memory_free = memory_free
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(inputs_embeds=emb, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), emb.grad, grads


def _assert_bitwise(model, bf16):
    ids = torch.randint(0, 97, (2, 8))
    loss_s, emb_s, g_s = _grads(model, ids, False, bf16)
    loss_m, emb_m, g_m = _grads(model, ids, True, bf16)
    assert torch.isfinite(loss_s)
    assert torch.equal(loss_m, loss_s) and torch.equal(emb_m, emb_s)
    assert g_m.keys() == g_s.keys() and len(g_s) == len(list(model.parameters()))
    for name in g_s:
        assert torch.equal(g_m[name], g_s[name]), name
    assert model.drift_monitor.last_bottom == 0.0


# Fast: every dynamics in both families and both precisions, crossed so that each family meets each
# precision; the full cross product (and random weights) is the slow test below.
CROSSED = [("gpt2", True), ("llama", False), ("gpt2", False), ("llama", True)]
FAST = [(d, *CROSSED[(2 * i + r) % 4]) for i, d in enumerate(EXACT) for r in range(2)]


@pytest.mark.parametrize("dynamics,block,bf16", FAST)
def test_exact_memory_free_gradients_equal_stored_bitwise(dynamics, block, bf16):
    _assert_bitwise(_model(dynamics, block), bf16)


@pytest.mark.slow
@pytest.mark.parametrize("sharpen", [1.0, 4.0], ids=["random", "sharpened"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", FAMILIES)
@pytest.mark.parametrize("dynamics", list(EXACT))
def test_exact_bitwise_all_combinations(dynamics, block, bf16, sharpen):
    _assert_bitwise(_model(dynamics, block, sharpen=sharpen), bf16)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dynamics", list(EXACT))
def test_fixed_point_reconstruction_is_bit_identical(dynamics, bf16):
    model = _model(dynamics, "gpt2" if bf16 else "llama")
    dyn, bits = model.dynamics, 32
    ids = torch.randint(0, 97, (2, 8))
    p0, kw = model.model.embed(ids, torch.arange(8).expand(2, 8))
    X0 = fxp.to_fixed(torch.randn_like(p0), bits)
    Y0 = fxp.to_fixed(p0.detach(), bits)
    steps = [(j, b, part) for j, b in enumerate(model.model.layers) for part in dyn.parts]
    f = lambda blk, part, Q: blk(fxp.to_float(Q, bits, torch.float32), part=part, **kw)  # noqa: E731
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        X, Y, lows = X0, Y0, []
        for j, blk, part in steps:
            Z, low = dyn.step_exact(j, X, Y, f(blk, part, Y), bits)
            X, Y = Y, Z
            lows.append(low)
        assert not torch.equal(Y, Y0)
        for (j, blk, part), low in zip(reversed(steps), reversed(lows)):
            X, Y = dyn.inverse_exact(j, X, Y, f(blk, part, X), low, bits), X
    assert torch.equal(X, X0) and torch.equal(Y, Y0)


def test_exact_gradients_are_the_float_gradients_on_the_fixed_point_trajectory():
    """Straight-through rounding: in float64 the exact gradients match plain float autograd closely."""
    model = _model("midpoint_a", "llama", layers=6, sharpen=1.0, midpoint_a=MIXED_A).to(torch.float64)
    ids = torch.randint(0, 97, (2, 8))
    _, emb_e, g_e = _grads(model, ids, True, False)
    model.config.exact_reversal = False
    _, emb_f, g_f = _grads(model, ids, False, False)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(emb_e, emb_f) < 1e-6
    for n in g_f:
        assert rel(g_e[n], g_f[n]) < 1e-6, n


def test_non_dyadic_a_is_refused_naming_the_nearest_dyadic():
    with pytest.raises(ValueError, match=r"midpoint_a\[0\]=0\.3 .*0\.3125 \(5/16\) with k=4"):
        RevLLMConfig(dynamics="midpoint_a", midpoint_a=0.3, exact_reversal=True, num_hidden_layers=2)
    with pytest.raises(ValueError, match="not a nonzero dyadic"):  # the default random draw
        RevLLMConfig(dynamics="midpoint_a", exact_reversal=True, num_hidden_layers=4)
    with pytest.raises(ValueError, match="reversible"):
        RevLLMConfig(dynamics="euler", exact_reversal=True)
    # The dynamics refuses too, e.g. after a checkpoint replaced the coefficients.
    model = _model("midpoint_a", layers=2, midpoint_a=0.5)
    model.dynamics.a[1] = 0.3
    model.dynamics._a_cache = None
    with pytest.raises(ValueError, match=r"layer 1, got 0\.3.*0\.3125"):
        ids = torch.randint(0, 97, (1, 4))
        model(ids, labels=ids).loss.backward()


def test_quantized_random_draw_and_lifted_floor():
    cfg = RevLLMConfig(dynamics="midpoint_a", exact_reversal=True, midpoint_a_dyadic_bits=4, num_hidden_layers=16)
    from revllm.dynamics.midpoint import draw_midpoint_a

    a = draw_midpoint_a(cfg)
    assert all(v * 16 == round(v * 16) and 0.5 <= abs(v) <= 1.5 for v in a)
    RevLLMConfig(dynamics="midpoint_a", exact_reversal=True, midpoint_a=1 / 64, num_hidden_layers=2)
    with pytest.raises(ValueError, match="midpoint_a_floor"):
        RevLLMConfig(dynamics="midpoint_a", midpoint_a=1 / 64, num_hidden_layers=2)


def test_headroom_overflow_is_an_error():
    model = _model("midpoint", layers=2, exact_fraction_bits=56)
    ids = torch.randint(0, 97, (1, 4))
    emb = model.get_input_embeddings()(ids).detach() * 100
    with pytest.raises(ValueError, match="int64 headroom .* exact_fraction_bits=56"):
        model(inputs_embeds=emb, labels=ids)
    with pytest.raises(ValueError, match="exact_fraction_bits"):
        RevLLMConfig(exact_fraction_bits=80)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 11, 16])
def test_low_bit_buffer_packs_k_bits_per_element(k):
    low = torch.randint(0, 2**k, (3, 5, 7), dtype=torch.int64)
    packed = fxp.pack_bits(low, k)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(low.numel() * k / 8)
    assert torch.equal(fxp.unpack_bits(packed, k, low.shape), low)


def test_engine_buffer_is_k_bits_per_element_per_layer():
    model = _model("midpoint_a", layers=LAYERS)  # k_j cycles 2, 1, 2, 1, 4, 4; a = +-1 would need none
    ids = torch.randint(0, 97, (2, 8))
    p0, kw = model.model.embed(ids, torch.arange(8).expand(2, 8))
    stack = Stack(model.model.layers, model.dynamics, kw, exact_bits=32)
    _, y = run_stack(p0, p0, stack, memory_free=True)
    sides = y.grad_fn.sides  # the autograd node is the Function's ctx
    ks = [fxp.dyadic(a)[1] for a in EXACT["midpoint_a"]["midpoint_a"]]
    assert [s.numel() for s in sides] == [math.ceil(p0.numel() * k / 8) for k in ks]
    assert sum(s.numel() * s.element_size() for s in sides) * 8 == p0.numel() * sum(ks)


def _drift(exact, bf16=True, **kw):
    model = _model("leapfrog", "llama", exact_reversal=exact, drift_monitor=True, **kw)
    ids = torch.randint(0, 97, (2, 8))
    _grads(model, ids, True, bf16)
    return model


def test_drift_monitor_is_zero_in_exact_mode_and_positive_in_float_bf16():
    mon = _drift(True).drift_monitor
    assert len(mon.last_per_layer) == LAYERS and set(mon.last_per_layer) == {0.0} and mon.last_bottom == 0.0
    mon = _drift(False).drift_monitor
    assert len(mon.last_per_layer) == LAYERS and max(mon.last_per_layer) > 0 and mon.last_bottom > 0
    assert mon.fallbacks == 0


def test_bottom_drift_is_always_on_and_logged(caplog):
    model = _model("midpoint", layers=4, exact_reversal=False)
    ids = torch.randint(0, 97, (2, 8))
    with caplog.at_level(logging.DEBUG, logger="revllm.drift"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, labels=ids).loss.backward()
    assert model.drift_monitor.last_bottom > 0
    assert "reconstruction drift at the bottom state" in caplog.text


def test_drift_fallback_uses_the_stored_states():
    ids = torch.randint(0, 97, (2, 8))
    model = _model("leapfrog", "llama", exact_reversal=False)
    # fp32: under bf16 the two paths' different fp32 summation orders round differently in the bf16
    # casts (~bf16 eps), which hides what is tested here.
    ref = _grads(model, ids, False, False)[2]  # stored activations: the true gradient
    rel = lambda g: max(((g[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)  # noqa: E731
    plain = rel(_grads(model, ids, True, False)[2])  # float reconstruction drifts
    model.config.update(dict(drift_monitor=True, drift_threshold=1e-12, drift_fallback=True))
    with pytest.warns(UserWarning, match="fell back to the stored states"):
        fallback = rel(_grads(model, ids, True, False)[2])
    assert model.drift_monitor.fallbacks == 1
    assert fallback < 1e-5 < plain and fallback < plain / 10


def test_exact_forward_is_identical_with_and_without_grad_and_in_eval():
    model = _model("midpoint_a", "gpt2", layers=6, midpoint_a=MIXED_A)
    ids = torch.randint(0, 97, (2, 8))
    loss_mf = model(ids, labels=ids).loss  # memory-free engine
    model.config.memory_free = False
    loss_st = model(ids, labels=ids).loss  # stored reference
    with torch.no_grad():
        loss_ng = model(ids, labels=ids).loss  # forward only
    assert torch.equal(loss_mf, loss_st) and torch.equal(loss_st, loss_ng)
