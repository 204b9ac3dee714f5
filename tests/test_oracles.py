"""Oracles written straight from the paper's equations, independent of ``revllm.dynamics`` and the engine.

Each rule is a plain loop over layers (paper eqs. 2.2, 2.4, 2.6, 3.6, 2.8-2.9; /work/shared/paper.md
section 3, README's dynamics table) built from the model's own block submodules (norms, attention,
MLP) -- never from revllm's ``step`` / ``inverse`` / ``coefficients``. Ordinary autograd through that
loop is the gradient reference for the memory-free backward and for exact (fixed-point) mode.

Tolerances (float64): the oracle and revllm add the same terms in a different order, so they differ by
a few ulps per layer (~1e-15 relative); 1e-10 leaves five orders of margin and is ~1e8 below what a
wrong coefficient, stream or half-step order changes (>= 1e-3 relative on these models, checked by the
"distinguishes" test below). Exact mode rounds every stream to 2^-32 per layer, so it is compared at
1e-7 (observed up to 3e-9), still 1e4 below any rule error.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, tiny_model

INITIAL = ["copy", "zero", "fixed_point"]
LAYERS = 3
H = {
    "euler": 1.0,
    "midpoint": 0.35,
    "leapfrog": 0.8,
    "midpoint_a": 0.9,
    "hamiltonian": 0.7,
}  # not the defaults: h enters
A_DYADIC = [0.75, -1.25, 1.5]  # midpoint_a's a_j, dyadic so exact mode applies; |a| >= floor 0.25
TOL, TOL_EXACT = 1e-10, 1e-7


def _model(block, dynamics, initial="copy", **kw):
    extra = dict(midpoint_a=A_DYADIC) if dynamics == "midpoint_a" and "midpoint_a" not in kw else {}
    extra.update(kw)
    # initializer_range 0.2: block outputs comparable to the streams, so every term of a rule matters.
    m = tiny_model(
        block=block,
        dynamics=dynamics,
        layers=LAYERS,
        step_size=H[dynamics],
        initial_state=initial,
        initializer_range=0.2,
        dtype=torch.float64,
        **extra,
    )
    return m.train()  # dropout is 0: train() only makes the training paths run


# -- the oracle ---------------------------------------------------------------------------------------
def _halves(model, block, ids):
    """Embedding p_0 and the two halves of each layer's branch, f = Attn(LN1(p)) + MLP(LN2(p + Attn(LN1(p)))) (eq. 2.5)."""
    backbone, pos = model.model, torch.arange(ids.shape[1])[None]
    if model.config.block == "gpt2":
        p0 = backbone.wte(ids) + backbone.wpe(pos)
        attn = lambda L, x: L.attn(L.ln_1(x))  # noqa: E731
        mlp = lambda L, x: L.mlp(L.ln_2(x))  # noqa: E731
    else:
        p0, rope = backbone.embed_tokens(ids), backbone.rotary_emb(pos, torch.float64)
        attn = lambda L, x: L.self_attn(L.input_layernorm(x), rope)  # noqa: E731
        mlp = lambda L, x: L.mlp(L.post_attention_layernorm(x))  # noqa: E731
    return p0, attn, mlp


def oracle_logits(model, ids, a=None):
    """The paper's rules as plain per-layer loops. ``a``: midpoint_a's per-layer coefficients."""
    cfg = model.config
    rule, h, layers = cfg.dynamics, cfg.step_size, list(model.model.layers)
    p0, attn, mlp = _halves(model, model.config.block, ids)

    def f(j, p):
        at = attn(layers[j], p)
        return at + mlp(layers[j], p + at)

    # Second initial state (README: copy p_{-1} = p_0 (Hamiltonian q_0 = p_0), zero, fixed_point).
    older = {"copy": p0, "zero": torch.zeros_like(p0), "fixed_point": p0 - h * f(0, p0) if layers else None}[
        cfg.initial_state
    ]
    prev, p = older, p0
    for j in range(len(layers)):
        if rule == "euler":  # (2.2)
            p = p + h * f(j, p)
        elif rule == "midpoint":  # (2.4)
            prev, p = p, prev + 2 * h * f(j, p)
        elif rule == "leapfrog":  # (2.6)
            prev, p = p, 2 * p - prev + h * h * f(j, p)
        elif rule == "midpoint_a":  # (3.6)
            prev, p = p, a[j] * prev + (1 - a[j]) * p + h * f(j, p)
        elif rule == "hamiltonian":  # (2.8)-(2.9): q from attention at the old p, then p from the MLP at the new q
            q = prev
            q = q + h * attn(layers[j], p)
            p = p + h * mlp(layers[j], q)
            prev = q
        else:
            raise AssertionError(rule)
    return model.lm_head(model.model.final_norm(p))  # read-out: the newest p


def oracle_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _a(model):
    return model.dynamics.a.tolist() if model.config.dynamics == "midpoint_a" else None


def _rel(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


def _ids(seed=0, shape=(2, 10)):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


# -- forward ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("initial", INITIAL)
@pytest.mark.parametrize("block", FAMILIES)
@pytest.mark.parametrize("dynamics", list(H))
def test_forward_logits_equal_the_papers_rule(dynamics, block, initial):
    model, ids = _model(block, dynamics, initial), _ids()
    with torch.no_grad():
        ref = oracle_logits(model, ids, _a(model))
        got = model(ids).logits
    assert _rel(got, ref) <= TOL


@pytest.mark.parametrize("block", FAMILIES)
def test_midpoint_a_seeded_draw_follows_eq_3_6(block):
    """The default random a_j (read from the buffer as data) enter as A = a_j, B = 1 - a_j."""
    model = _model(block, "midpoint_a", midpoint_a=None)
    a = model.dynamics.a.tolist()
    assert len(set(a)) == LAYERS  # a real per-layer draw, not a constant
    with torch.no_grad():
        assert _rel(model(_ids()).logits, oracle_logits(model, _ids(), a)) <= TOL


def test_oracle_distinguishes_the_rules():
    """The tolerance is meaningful: on these models every pair of rules, and the swapped Hamiltonian
    order, differ by far more than TOL (so a wrong coefficient or order cannot pass)."""
    ids = _ids()
    model = _model("llama", "hamiltonian")
    with torch.no_grad():
        ref = oracle_logits(model, ids)
        # MLP half first, then attention: the bug the table names.
        p0, attn, mlp = _halves(model, "llama", ids)
        q, p = p0, p0
        for L in model.model.layers:
            q = q + model.config.step_size * mlp(L, p)
            p = p + model.config.step_size * attn(L, q)
        swapped = model.lm_head(model.model.final_norm(p))
    assert _rel(swapped, ref) > 1e-3
    outs = {}
    for rule in H:
        m = _model("llama", rule)
        with torch.no_grad():
            outs[rule] = m(ids).logits
    for r1 in outs:
        for r2 in outs:
            if r1 < r2:
                assert _rel(outs[r1], outs[r2]) > 1e-3, (r1, r2)


# -- loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", FAMILIES)
def test_training_loss_is_mean_next_token_cross_entropy(block):
    """The chunked training loss (labels unshifted, -100 ignored) equals F.cross_entropy on the oracle's
    shifted logits, in the training branch (grad enabled, memory-free) and in evaluation."""
    model, ids = _model(block, "midpoint"), _ids(shape=(3, 11))
    labels = ids.clone()
    labels[0, 3:7] = -100
    labels[2, -1] = -100
    with torch.no_grad():
        ref = oracle_loss(oracle_logits(model, ids), labels)
        ev = model(ids, labels=labels).loss
    tr = model(ids, labels=labels).loss  # grad enabled: checkpointed chunks, memory-free stack
    assert abs(tr.item() - ref.item()) <= TOL * ref.item() and abs(ev.item() - ref.item()) <= TOL * ref.item()


# -- gradients ----------------------------------------------------------------------------------------
def _revllm_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _oracle_grads(model, ids, labels):
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    loss = oracle_loss(oracle_logits(model, ids, _a(model)), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


MODES = {
    "memory_free": dict(memory_free=True),
    "exact": dict(memory_free=True, exact_reversal=True),
    "stored": dict(memory_free=False),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("initial", INITIAL)
@pytest.mark.parametrize("block", FAMILIES)
@pytest.mark.parametrize("dynamics", ["midpoint", "leapfrog", "midpoint_a", "hamiltonian"])
def test_gradients_equal_autograd_through_the_papers_rule(dynamics, block, initial, mode):
    """Every parameter's gradient (embedding and tied LM head included) from revllm's memory-free,
    exact (int64 fixed-point) and stored modes equals autograd through the oracle loop."""
    model, ids = _model(block, dynamics, initial, **MODES[mode]), _ids(1)
    labels = ids.clone()
    labels[1, :4] = -100
    loss_o, g_o = _oracle_grads(model, ids, labels)
    loss_r, g_r = _revllm_grads(model, ids, labels)
    tol = TOL_EXACT if mode == "exact" else TOL
    assert abs(loss_r.item() - loss_o.item()) <= tol * loss_o.item()
    assert g_r.keys() == g_o.keys()
    for name in g_o:
        assert _rel(g_r[name], g_o[name]) <= tol, name


@pytest.mark.parametrize("block", FAMILIES)
def test_euler_stored_gradients_equal_the_residual_network(block):
    model, ids = _model(block, "euler"), _ids(2)
    loss_o, g_o = _oracle_grads(model, ids, ids)
    loss_r, g_r = _revllm_grads(model, ids, ids)
    assert abs(loss_r.item() - loss_o.item()) <= TOL * loss_o.item()
    assert all(_rel(g_r[n], g_o[n]) <= TOL for n in g_o)


@pytest.mark.parametrize("dynamics", ["midpoint", "leapfrog", "hamiltonian"])
def test_exact_mode_deep_stack_matches_oracle(dynamics):
    """12 layers: exact reconstruction keeps the memory-free gradients on the oracle's (rounded) trajectory."""
    torch.manual_seed(3)
    model = tiny_model(
        block="llama",
        dynamics=dynamics,
        layers=12,
        initializer_range=0.05,
        dtype=torch.float64,
        exact_reversal=True,
        step_size=H[dynamics],
    ).train()
    ids = _ids(3)
    _, g_o = _oracle_grads(model, ids, ids)
    _, g_r = _revllm_grads(model, ids, ids)
    assert max(_rel(g_r[n], g_o[n]) for n in g_o) <= TOL_EXACT
