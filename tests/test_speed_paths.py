"""Fast paths of the training step (issue 20): each must be the same function as the path it replaces."""

import pytest
import torch
from conftest import tiny_model

from revllm.modeling import loss as loss_mod
from revllm.modeling.loss import chunked_causal_lm_loss, loss_path


def _loss_and_grads(chunk, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 8, generator=g, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=True).to(dtype)
    labels = torch.randint(0, 13, (3, 11), generator=g)
    labels[1, :4] = -100
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk)
    loss.backward()
    return loss.detach(), hidden.grad, head.weight.grad, head.bias.grad


def _count_head_evaluations(monkeypatch):
    calls = []
    inner = loss_mod._chunk_loss_sum

    def counted(h, *a):
        calls.append(h.shape[0])
        return inner(h, *a)

    monkeypatch.setattr(loss_mod, "_chunk_loss_sum", counted)
    return calls


def test_loss_path_threshold():
    assert loss_path(30, 30) == "full" and loss_path(0, 1) == "full"
    assert loss_path(31, 30) == "chunked"


def test_full_and_chunked_loss_agree_in_float64():
    full = _loss_and_grads(chunk=1000)
    for chunk in (1, 7, 29):
        for a, b in zip(full, _loss_and_grads(chunk)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_one_chunk_evaluates_the_head_once(monkeypatch):
    calls = _count_head_evaluations(monkeypatch)
    _loss_and_grads(chunk=30)  # 3 * 10 = 30 shifted tokens: one chunk
    assert calls == [30]  # no recompute in the backward


def test_beyond_one_chunk_recomputes_each_chunk(monkeypatch):
    calls = _count_head_evaluations(monkeypatch)
    _loss_and_grads(chunk=16)  # 30 tokens: chunks of 16 and 14, each rebuilt in the backward
    assert sorted(calls) == [14, 14, 16, 16]


@pytest.mark.parametrize("chunk, expected", [(64, [38]), (16, [16, 16, 6] * 2)])
def test_model_loss_picks_path_by_chunk_size(monkeypatch, chunk, expected):
    calls = _count_head_evaluations(monkeypatch)
    model = tiny_model(loss_chunk_size=chunk)
    ids = torch.randint(0, 97, (2, 20))
    model(ids, labels=ids).loss.backward()
    assert sorted(calls) == sorted(expected)


def test_euler_builds_no_unused_initial_state():
    """euler never reads the older stream: a fixed-point initial state must not cost a layer evaluation."""
    model = tiny_model(dynamics="euler", initial_state="fixed_point", dtype=torch.float64)
    ref = tiny_model(dynamics="euler", initial_state="copy", dtype=torch.float64)
    calls = []
    model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(model(ids, labels=ids).loss, ref(ids, labels=ids).loss)
    assert len(calls) == 1


def _step(model, ids, memory_free):
    model.config.memory_free = memory_free
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=emb, labels=ids).loss
    loss.backward()
    return loss.detach(), emb.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dynamics", ["midpoint", "leapfrog", "midpoint_a"])
def test_fused_fixed_point_start_matches_autograd_float64(monkeypatch, dynamics):
    """The engine's fused x_0 = p_0 - h f_0(p_0) (one f_0 evaluation) against the unfused start under
    ordinary autograd (layer 0 evaluated twice), float64."""
    model = tiny_model(dynamics=dynamics, layers=4, initial_state="fixed_point", step_size=1.0, dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 12))
    calls = []
    model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    fused = _step(model, ids, memory_free=True)
    assert len(calls) == 2  # forward + the backward's recompute; unfused it is 3
    monkeypatch.setattr(type(model), "_fuse_initial_state", lambda self, *a: False)
    ref = _step(model, ids, memory_free=False)
    for a, b in zip(fused[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for n in ref[2]:
        torch.testing.assert_close(fused[2][n], ref[2][n], rtol=1e-10, atol=1e-12, msg=n)


def test_fused_fixed_point_start_is_bitwise_in_exact_mode():
    """Exact streams: memory-free and the engine's stored reference agree bit for bit with the fused start."""
    model = tiny_model(
        dynamics="midpoint_a",
        midpoint_a=1 / 16,
        exact_reversal=True,
        layers=6,
        initial_state="fixed_point",
        step_size=1.0,
    )
    ids = torch.randint(0, 97, (2, 8))
    mf, st = _step(model, ids, True), _step(model, ids, False)
    assert torch.equal(mf[0], st[0]) and torch.equal(mf[1], st[1])
    for n in st[2]:
        assert torch.equal(mf[2][n], st[2][n]), n
    assert model.drift_monitor.last_bottom == 0.0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_whole_values_per_byte_packing_keeps_the_bit_layout(k):
    """The uint8 fast path for k | 8 writes the generic little-endian bit stream, byte for byte."""
    from revllm.dynamics import fixedpoint as fxp

    low = torch.randint(0, 2**k, (3, 5, 7), dtype=torch.int64)
    bits = ((low.reshape(-1, 1) >> torch.arange(k)) & 1).reshape(-1)
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).view(-1, 8)
    ref = (bits << torch.arange(8)).sum(-1).to(torch.uint8)
    assert torch.equal(fxp.pack_bits(low, k), ref)
    assert torch.equal(fxp.unpack_bits(ref, k, low.shape), low)
