"""Edge contracts of the dynamics protocol, the engine and the loss that the rest of the suite let through:
each test here kills mutants that survived mutmut (docs/mutation.md lists them by name)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model

from revllm.dynamics import DYNAMICS, Dynamics
from revllm.engine import Stack, run_stack
from revllm.engine.function import initial_state
from revllm.modeling.loss import chunked_causal_lm_loss


def _rule(name, layers=2, **kw):
    return DYNAMICS[name](tiny_config(dynamics=name, layers=layers, **kw))


class _NonDyadicB(Dynamics):
    """A = 1 (dyadic), B = 5.3 (not dyadic: its product is formed in float64, bounded by int(|B|) + 1)."""

    name = "non_dyadic_b"

    def coefficients(self, j):
        return 1.0, 5.3, self.h


class _Block(torch.nn.Module):
    """f(y) = tanh(W y): the engine calls any module as block(y, part=...)."""

    def __init__(self, seed, width=8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(width, width, generator=g, dtype=torch.float64) / width**0.5)

    def forward(self, y, part="full"):
        return torch.tanh(y @ self.w)


# -- check_exact: the int64 headroom factor and its refusals --------------------------------------------
@pytest.mark.parametrize(
    "name, kw, growth",
    [
        ("midpoint", {}, 4),  # A = 1, B = 0: the floor of 4
        ("leapfrog", {}, 4),  # A = -1, B = 2
        # B = 15/16: its numerator 15 multiplies the stream
        ("midpoint_a", {"midpoint_a": 1 / 16, "midpoint_a_floor": 0.05}, 15),
        ("midpoint_a", {"midpoint_a": [0.5, 1.75]}, 7),  # A = 7/4 (k = 2 < 7), B = -3/4
        # the stored layer 0 (non-dyadic A, never divided by) is skipped
        ("midpoint_a", {"midpoint_a": [0.3, 1 / 16], "midpoint_a_floor": 0.05, "stored_layers": [0]}, 15),
    ],
)
def test_check_exact_growth_is_the_largest_integer_multiplier(name, kw, growth):
    """Z = floor(m_A X / 2^k) + round(m_B Y / 2^k') + ...: the largest |m| (at least 4) bounds the
    int64 intermediate; a smaller factor would let the headroom check pass an overflowing stream."""
    assert _rule(name, **kw).check_exact() == growth


def test_check_exact_growth_of_a_non_dyadic_b_is_its_integer_ceiling():
    assert _NonDyadicB(tiny_config(layers=2)).check_exact() == 6


def test_check_exact_checks_the_layers_after_a_stored_one():
    """A stored layer's own A is never used; a non-dyadic A in a later layer is still refused."""
    with pytest.raises(ValueError, match=r"^exact_reversal needs a dyadic coefficient .* layer 1, got 0\.3;"):
        _rule("midpoint_a", midpoint_a=[0.5, 0.3], stored_layers=[0]).check_exact()


def test_check_exact_messages_name_the_problem():
    with pytest.raises(ValueError, match=r"^exact_reversal needs a reversible dynamics; 'euler' is not$"):
        _rule("euler").check_exact()
    # nearest m/2^k with k = 4 and k = 16 (0.33 * 16 = 5.28 -> 5; 0.33 * 65536 = 21626.88 -> 21627)
    with pytest.raises(ValueError) as e:
        _rule("midpoint_a", midpoint_a=0.33).check_exact()
    assert str(e.value) == (
        "exact_reversal needs a dyadic coefficient A = m/2^k (k <= 16) in 'midpoint_a' layer 0, got 0.33; "
        "nearest dyadic: 0.3125 (5/16) with k=4, 0.330002 (21627/65536) with k=16"
    )


def test_overriding_several_derived_methods_names_them_all():
    def own(self, *args):
        raise AssertionError("never called")

    with pytest.raises(TypeError, match=r"^dynamics MyRule overrides step, inverse: a rule defines only"):
        type("MyRule", (Dynamics,), {"coefficients": lambda self, j: (1.0, 0.0, 1.0), "step": own, "inverse": own})


# -- engine ------------------------------------------------------------------------------------------
def test_fixed_point_initial_state_is_formed_in_the_stream_dtype():
    """x_0 = y_0 - h f_0(y_0) with f in bf16 (autocast) and fp32 streams: h * f is taken in fp32, not
    rounded to bf16 first."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, generator=g)
    fy = torch.randn(64, generator=g).bfloat16()
    x0 = initial_state(y, fy, 0.3)
    assert x0.dtype == torch.float32
    assert torch.equal(x0, y - 0.3 * fy.float())
    assert not torch.equal(x0, y - 0.3 * fy)  # the bf16 product differs here: the check can fail


@pytest.mark.parametrize("memory_free", [False, True])
def test_layer_terms_of_an_empty_stack_sum_to_a_zero_scalar(memory_free):
    """No layers: the per-layer term is 0 (a 0-d tensor of the stream dtype), not an error."""
    y = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    stack = Stack(blocks=[], dynamics=_rule("midpoint", layers=1), layer_loss=lambda j, z: z.sum())
    x_out, y_out, term = run_stack(y, y, stack, memory_free=memory_free)
    assert term.shape == () and term.dtype == torch.float64 and term.item() == 0.0
    assert torch.equal(y_out, y)


def test_checkpointing_in_exact_mode_warns_with_the_whole_message():
    model = tiny_model(dynamics="midpoint_a", midpoint_a=1 / 16, exact_reversal=True, memory_free=False).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 97, (2, 8))
    with pytest.warns(UserWarning) as rec:
        model(ids, labels=ids).loss.backward()
    assert [str(w.message) for w in rec if "checkpointing" in str(w.message)] == [
        "activation checkpointing runs float streams; exact_reversal's fixed-point trajectory is kept by "
        "memory_free=True or by the stored path without checkpointing"
    ]


def test_checkpoint_function_receives_each_layer_it_recomputes():
    """Stack.checkpoint(fn, j, block, x, y): the block is passed so that the checkpoint sees the layer."""
    blocks = [_Block(seed) for seed in range(3)]
    seen = []

    def checkpoint(fn, j, block, *args):
        seen.append((j, block))
        return fn(j, block, *args)

    y = torch.randn(1, 4, 8, dtype=torch.float64)
    stack = Stack(blocks=blocks, dynamics=_rule("midpoint", layers=3), checkpoint=checkpoint)
    run_stack(y, y, stack, memory_free=False)
    assert seen == list(enumerate(blocks))


# -- step / inverse against the two-step form, written out ----------------------------------------------
A_LIST = [0.75, -1.25, 2.0, -3.0, 1 / 16, 1.0, -1.0]  # B = 1 - a: 1/4, 9/4, -1, 4, 15/16, 0, 2
BITS = 20


def _midpoint_a(**kw):
    return _rule("midpoint_a", layers=len(A_LIST), midpoint_a=A_LIST, midpoint_a_floor=0.05, step_size=0.5, **kw)


def test_float_step_is_the_two_step_form_and_inverse_undoes_it():
    dyn, g = _midpoint_a(), torch.Generator().manual_seed(1)
    x, y, f = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for j, a in enumerate(A_LIST):
        z = dyn.step(j, x, y, f)
        torch.testing.assert_close(z, a * x + (1 - a) * y + 0.5 * f, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(dyn.inverse(j, y, z, f), x, rtol=1e-12, atol=1e-12)


def test_float_step_and_inverse_keep_the_stream_dtype():
    """Under autocast f(y) is bf16 and the streams fp32: C f(y) is formed in fp32 (not rounded to bf16)."""
    dyn, g = _rule("leapfrog", step_size=0.7), torch.Generator().manual_seed(2)
    x, y = torch.randn(64, generator=g), torch.randn(64, generator=g)
    f = torch.randn(64, generator=g).bfloat16()
    c = 0.7 * 0.7
    z = dyn.step(0, x, y, f)
    assert z.dtype == torch.float32 and torch.equal(z, c * f.float() + -1.0 * x + 2.0 * y)
    r = dyn.inverse(0, y, z, f)
    assert r.dtype == torch.float32 and torch.equal(r, ((z - c * f.float()) - 2.0 * y) / -1.0)


def test_exact_step_is_floor_and_round_half_up_of_the_exact_products():
    """Z = floor(m_A X / 2^k) + round_half_up(B Y) + round(C f 2^bits) on int64 streams (Python Fractions
    as the reference), and inverse_exact returns X bit for bit from (Y, Z, f, the dropped bits)."""
    from fractions import Fraction

    dyn, g = _midpoint_a(), torch.Generator().manual_seed(3)
    X = torch.randint(-(2**40), 2**40, (4, 6), generator=g)
    Y = torch.randint(-(2**40), 2**40, (4, 6), generator=g)
    f = torch.randint(-(2**12), 2**12, (4, 6), generator=g).double() / 2**10  # C f 2^bits exact in float64
    for j, a in enumerate(A_LIST):
        Z, low = dyn.step_exact(j, X, Y, f, BITS)
        fa, fb = Fraction(a), Fraction(1 - a)
        ref = [
            (fa * xv).__floor__() + (fb * yv + Fraction(1, 2)).__floor__() + round(Fraction(fv) / 2 * 2**BITS)
            for xv, yv, fv in zip(X.flatten().tolist(), Y.flatten().tolist(), f.flatten().tolist())
        ]
        assert Z.flatten().tolist() == ref, a
        assert (low is None) == (fa.denominator == 1), a
        assert torch.equal(dyn.inverse_exact(j, Y, Z, f, low, BITS), X), a


def test_stored_layers_step_as_the_residual_and_refuse_reconstruction():
    """A stored layer is z = y + f(y) (A = 0, B = 1, C = 1, whatever the rule's h), and asking to rebuild
    its input is an error in both precisions."""
    dyn, g = _midpoint_a(stored_layers=[2]), torch.Generator().manual_seed(4)
    x, y, f = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    assert dyn.layer_coefficients(2) == (0.0, 1.0, 1.0) and dyn.layer_coefficients(1) == (-1.25, 2.25, 0.5)
    assert torch.equal(dyn.step(2, x, y, f), f + y)
    X, Y = torch.tensor([5, -7]), torch.tensor([3, 9])
    Z, low = dyn.step_exact(2, X, Y, torch.tensor([0.25, -0.5], dtype=torch.float64), BITS)
    assert low is None and Z.tolist() == [3 + 2**18, 9 - 2**19]
    with pytest.raises(RuntimeError, match=r"^dynamics 'midpoint_a' layer 2 is not reversible \(stored layers keep"):
        dyn.inverse(2, y, f, f)
    with pytest.raises(RuntimeError, match=r"^dynamics 'midpoint_a' layer 2 is stored: its input is kept"):
        dyn.inverse_exact(2, Y, Z, f, None, BITS)
    with pytest.raises(RuntimeError, match=r"^dynamics 'euler' layer 0 is not reversible"):
        _rule("euler").inverse(0, y, f, f)


def test_midpoint_a_coefficients_follow_a_replaced_buffer():
    """The python-float cache of a_j is rebuilt when the buffer changes length (a model grown or reloaded)."""
    dyn = _rule("midpoint_a", layers=2, midpoint_a=[0.5, -0.5])
    assert dyn.coefficients(1) == (-0.5, 1.5, dyn.h)
    dyn.a = torch.tensor([0.75, 1.25, -0.75], dtype=torch.float64)
    assert dyn.coefficients(2) == (-0.75, 1.75, dyn.h)


# -- loss ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [4, 64])
def test_low_precision_logits_get_an_fp32_softmax(dtype, chunk):
    """fp16 / bf16 logits are cast to fp32 before the cross-entropy (as HF does), in both loss paths."""
    g = torch.Generator().manual_seed(5)
    hidden = (3 * torch.randn(2, 9, 8, generator=g)).to(dtype)
    head = torch.nn.Linear(8, 50, bias=False).to(dtype)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk)
    logits = F.linear(hidden[:, :-1].reshape(-1, 8), head.weight).float()
    ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    in_low = F.cross_entropy(F.linear(hidden[:, :-1].reshape(-1, 8), head.weight), labels[:, 1:].reshape(-1))
    assert (in_low.float() - ref).abs() > 1e-6 * ref  # the low-precision softmax really differs


@pytest.mark.parametrize("frozen", ["head", "hidden"])
def test_chunks_are_recomputed_whenever_anything_needs_a_gradient(monkeypatch, frozen):
    """Chunked path (bf16): each chunk's logits are rebuilt in the backward (checkpointed) when either the
    hidden states or the LM head needs a gradient; without grad each chunk is evaluated once."""
    from revllm.modeling import loss as loss_mod

    calls, inner = [], loss_mod._chunk_loss_sum
    monkeypatch.setattr(loss_mod, "_chunk_loss_sum", lambda h, *a: calls.append(h.shape[0]) or inner(h, *a))
    hidden = torch.randn(2, 9, 8, dtype=torch.bfloat16, requires_grad=frozen == "head")
    head = torch.nn.Linear(8, 13, dtype=torch.bfloat16)
    head.requires_grad_(frozen == "hidden")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "use_reentrant should be passed explicitly": no noise per step
        loss_mod.chunked_causal_lm_loss(hidden, head, torch.randint(0, 13, (2, 9)), 10).backward()
    assert sorted(calls) == [6, 6, 10, 10]
    calls.clear()
    with torch.no_grad():
        loss_mod.chunked_causal_lm_loss(hidden, head, torch.randint(0, 13, (2, 9)), 10)
    assert sorted(calls) == [6, 10]


def test_midpoint_a_coefficients_follow_a_loaded_state_dict():
    """load_state_dict after a forward (the float cache of a_j is filled) replaces the coefficients."""
    model = tiny_model(dynamics="midpoint_a", midpoint_a=[0.5, -0.5], layers=2)
    ids = torch.randint(0, 97, (1, 4))
    model(ids)  # fills the cache
    state = model.state_dict()
    state["dynamics.a"] = torch.tensor([0.75, 1.25], dtype=torch.float64)
    model.load_state_dict(state)
    assert model.dynamics.coefficients(1) == (1.25, -0.25, model.dynamics.h)


def test_midpoint_a_to_returns_the_module_with_float64_coefficients():
    dyn = _rule("midpoint_a", midpoint_a=[0.3, -0.7])
    assert dyn.to(torch.bfloat16) is dyn  # Module.to returns the module (chained calls)
    assert dyn.a.dtype == torch.float64 and dyn.a.tolist() == [0.3, -0.7]


def test_midpoint_a_follows_the_module_to_another_device():
    dyn = _rule("midpoint_a", midpoint_a=[0.3, -0.7]).to("meta")
    assert dyn.a.device.type == "meta" and dyn.a.dtype == torch.float64


def test_midpoint_a_seeded_draw_is_reproducible():
    """a_j = s_j + u_j (s_j = -1 where a float64 uniform draw is < 1/2, else +1; u_j = a second float64
    uniform - 1/2), from torch.Generator().manual_seed(midpoint_a_seed): pinned values, so that a model
    rebuilt from its config (HF's init path re-draws a) gets the same coefficients in every version."""
    from revllm.dynamics.midpoint import draw_midpoint_a

    cfg = tiny_config(dynamics="midpoint_a", layers=6, midpoint_a_seed=7)
    assert draw_midpoint_a(cfg) == [
        -1.2052878919871164,
        -0.9392784026278445,
        1.2630434112121387,
        1.2593572272132831,
        0.5630211204535751,
        0.5575558332630387,
    ]
    cfg = tiny_config(dynamics="midpoint_a", layers=6, midpoint_a_seed=7, midpoint_a_dyadic_bits=3)
    assert draw_midpoint_a(cfg) == [-1.25, -1.0, 1.25, 1.25, 0.625, 0.5]  # the draw above rounded to m/8


@pytest.mark.parametrize("path", ["fused", "full", "chunked"])
def test_loss_uses_the_heads_bias(monkeypatch, path):
    """An LM head with a bias (GPT-2 style heads may have one): logits = h W^T + b in every loss path, with
    and without grad (float64; the low-precision paths forced)."""
    from revllm.modeling import loss as loss_mod

    if path != "fused":
        monkeypatch.setattr(loss_mod, "loss_path", lambda *a: path)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 9, 8, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(8, 13, dtype=torch.float64)
    torch.nn.init.normal_(head.bias, std=2.0)
    labels = torch.randint(0, 13, (2, 9), generator=g)
    ref = F.cross_entropy(F.linear(hidden[:, :-1].reshape(-1, 8), head.weight, head.bias), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(chunked_causal_lm_loss(hidden, head, labels, 4), ref, rtol=1e-12, atol=0)
    with torch.no_grad():  # evaluation: the chunks are not checkpointed
        torch.testing.assert_close(chunked_causal_lm_loss(hidden, head, labels, 4), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_chunked_loss_supports_autograd_grad(monkeypatch, path):
    """torch.autograd.grad through the loss (reentrant checkpointing would refuse it), in the fused path
    and the checkpointed one (forced in float64)."""
    from revllm.modeling import loss as loss_mod

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 13, dtype=torch.float64)
    labels = torch.randint(0, 13, (2, 9), generator=g)
    (full,) = torch.autograd.grad(chunked_causal_lm_loss(hidden, head, labels, 64), hidden)
    if path != "fused":
        monkeypatch.setattr(loss_mod, "loss_path", lambda *a: path)
    (chunked,) = torch.autograd.grad(chunked_causal_lm_loss(hidden, head, labels, 4), hidden)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-15)


def test_labels_follow_the_hidden_states_device():
    """Labels on another device than the model's output are moved to it (the meta device stands in for a GPU)."""
    hidden = torch.randn(2, 5, 8, device="meta")
    head = torch.nn.Linear(8, 13).to("meta")
    assert chunked_causal_lm_loss(hidden, head, torch.randint(0, 13, (2, 5)), 100).device.type == "meta"


# -- drift monitor -------------------------------------------------------------------------------------
def _per_layer_warnings(model, ids):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model(ids, labels=ids).loss.backward()
    return [str(w.message) for w in rec if "per-layer drift" in str(w.message)]


def test_per_layer_drift_warns_only_strictly_above_the_threshold():
    """A drift equal to drift_threshold is within it (no warning); just below the drift, it warns."""
    model = tiny_model(dynamics="leapfrog", layers=4, drift_monitor=True, drift_threshold=1.0).train()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    assert _per_layer_warnings(model, ids) == []
    worst = max(model.drift_monitor.last_per_layer)
    assert worst > 0  # float reconstruction drifts (deterministically, run to run)
    model.config.drift_threshold = worst
    assert _per_layer_warnings(model, ids) == []
    assert max(model.drift_monitor.last_per_layer) == worst
    model.config.drift_threshold = worst * (1 - 1e-6)
    assert _per_layer_warnings(model, ids) == [
        f"reversible backward: per-layer drift {worst:.3g} > drift_threshold {worst * (1 - 1e-6):g}"
    ]


def test_fallback_warning_names_it_and_every_fallback_is_counted():
    model = tiny_model(
        dynamics="leapfrog", layers=4, drift_monitor=True, drift_threshold=1e-12, drift_fallback=True
    ).train()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in (1, 2):
        msgs = _per_layer_warnings(model, ids)
        worst = max(model.drift_monitor.last_per_layer)
        assert msgs == [
            f"reversible backward: per-layer drift {worst:.3g} > drift_threshold 1e-12; "
            "fell back to the stored states for this step"
        ]
        assert model.drift_monitor.fallbacks == step


@pytest.mark.parametrize("name", ["midpoint", "leapfrog", "midpoint_a", "hamiltonian"])
def test_gradient_reaches_both_output_streams(name):
    """run_stack returns the pair (x_L, y_L); the models read only y_L, but a loss on x_L too must get its
    gradient through the memory-free backward (checked against autograd through the stored path)."""
    dyn = _rule(name, layers=3, **({"midpoint_a": [0.75, -1.25, 1.5]} if name == "midpoint_a" else {}))
    blocks = [_Block(seed) for seed in range(3)]
    g = torch.Generator().manual_seed(8)
    y0 = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    wx, wy = (
        torch.randn(2, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 5, 8, generator=g, dtype=torch.float64),
    )
    grads = []
    for memory_free in (False, True):
        y = y0.clone().requires_grad_(True)
        x_out, y_out = run_stack(y, y, Stack(blocks=blocks, dynamics=dyn), memory_free=memory_free)
        ((x_out * wx).sum() + (y_out * wy).sum()).backward()
        grads.append([y.grad.clone()] + [b.w.grad.clone() for b in blocks])
        for b in blocks:
            b.w.grad = None
    for mf, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(mf, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["x", "y"])
def test_gradient_of_one_input_stream_alone(which):
    """Only one of the two input streams needs a gradient (e.g. a learned x_0 over a frozen embedding): it
    gets exactly the stored path's gradient, and the other gets none."""
    dyn, blocks = _rule("leapfrog", layers=3), [_Block(seed) for seed in range(3)]
    g = torch.Generator().manual_seed(9)
    x0, y0 = (torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    grads = []
    for memory_free in (False, True):
        x, y = x0.clone().requires_grad_(which == "x"), y0.clone().requires_grad_(which == "y")
        x_out, y_out = run_stack(x, y, Stack(blocks=blocks, dynamics=dyn), memory_free=memory_free)
        y_out.square().sum().backward()
        grads.append((x.grad, y.grad))
        for b in blocks:
            b.w.grad = None
    (x_ref, y_ref), (x_mf, y_mf) = grads
    assert (x_mf is None) == (which == "y") and (y_mf is None) == (which == "x")
    torch.testing.assert_close(x_mf if which == "x" else y_mf, x_ref if which == "x" else y_ref, rtol=1e-10, atol=0)


def test_fused_fixed_point_initial_state_with_frozen_embeddings():
    """initial_state="fixed_point" builds x_0 from the first layer's own evaluation; with frozen embeddings
    (the streams need no gradient, e.g. LoRA) the memory-free parameter gradients equal the stored ones."""
    grads = []
    for memory_free in (False, True):
        model = tiny_model(dynamics="midpoint", layers=3, dtype=torch.float64, initial_state="fixed_point")
        model.config.memory_free = memory_free
        model.get_input_embeddings().requires_grad_(False)
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(v is not None for v in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-14)


def test_per_layer_state_copies_only_with_the_per_layer_monitor(monkeypatch):
    """The forward keeps a copy of every state (O(depth) memory) only for the debug drift monitor."""
    import revllm.engine.function as engine_function

    seen, real = [], engine_function.walk
    monkeypatch.setattr(engine_function, "walk", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    ids = torch.randint(0, 97, (2, 8))
    for debug in (False, True):
        model = tiny_model(dynamics="midpoint", layers=3, drift_monitor=debug)
        model(ids, labels=ids).loss.backward()
    assert seen[0] is None and isinstance(seen[1], list) and len(seen) == 2


def test_engine_autocast_never_caches_weight_casts(monkeypatch):
    """Under the caller's autocast the engine runs its own autocast regions with cache_enabled=False: the
    weight-cast cache would otherwise keep a low-precision copy of every layer alive, peak memory growing
    with depth (memory is not observable on values, so the regions' arguments are checked)."""
    real, calls = torch.autocast, []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    model = tiny_model(dynamics="leapfrog", layers=3)
    ids = torch.randint(0, 97, (2, 8))
    with real("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(torch, "autocast", recording)
        loss = model(ids, labels=ids).loss
        loss.backward()
    engine = [c for c in calls if "enabled" in c and "dtype" in c]  # the engine passes its whole autocast state
    assert len(engine) >= 2 and all(c.get("cache_enabled") is False for c in engine)


def test_stored_layers_without_a_drift_monitor():
    """run_stack used directly (no drift monitor): a stored layer's kept input is found by the backward."""
    dyn, blocks = _rule("leapfrog", layers=3, stored_layers=[1]), [_Block(seed) for seed in range(3)]
    y0 = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    grads = []
    for memory_free in (False, True):
        y = y0.clone().requires_grad_(True)
        run_stack(y, y, Stack(blocks=blocks, dynamics=dyn), memory_free=memory_free)[1].square().sum().backward()
        grads.append([y.grad] + [b.w.grad.clone() for b in blocks])
        for b in blocks:
            b.w.grad = None
    for mf, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(mf, ref, rtol=1e-10, atol=1e-13)
