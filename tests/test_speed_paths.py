"""Fast paths of the training step (issue 20): each must be the same function as the path it replaces."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from revllm.modeling import loss as loss_mod
from revllm.modeling.loss import chunked_causal_lm_loss, loss_path


def _loss_and_grads(chunk, dtype=torch.float64, scale=1.0, reference=False):
    """Loss and the gradients of hidden states, weight and bias, through revllm's loss or (``reference``)
    ordinary autograd on the full logits; the same inputs every call, 4 ignored labels."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 8, generator=g, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=True).to(dtype)
    labels = torch.randint(0, 13, (3, 11), generator=g)
    labels[1, :4] = -100
    if reference:
        logits = head(hidden[:, :-1]).reshape(-1, 13)
        loss = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    else:
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk)
    (scale * loss).backward()
    return loss.detach(), hidden.grad, head.weight.grad, head.bias.grad


def _count_head_evaluations(monkeypatch):
    calls = []
    inner = loss_mod._chunk_loss_sum

    def counted(h, *a):
        calls.append(h.shape[0])
        return inner(h, *a)

    monkeypatch.setattr(loss_mod, "_chunk_loss_sum", counted)
    return calls


def test_loss_path_choice():
    """fp32 / fp64 take the fused path whatever the length; low precision or autocast take the full logits
    when they fit in one chunk, else the checkpointed chunks."""
    assert loss_path(10**6, 30, torch.float32) == "fused" and loss_path(5, 30, torch.float64) == "fused"
    assert loss_path(30, 30, torch.bfloat16) == "full" and loss_path(0, 1, torch.float16) == "full"
    assert loss_path(31, 30, torch.bfloat16) == "chunked"
    assert loss_path(31, 30, torch.float32, autocast=True) == "chunked"


@pytest.mark.parametrize("path", ["fused", "full", "chunked"])
@pytest.mark.parametrize("chunk", [1, 7, 29, 1000])
def test_every_loss_path_matches_autograd_in_float64(monkeypatch, path, chunk):
    """Loss and the gradients of hidden states, weight and bias against F.cross_entropy on the full logits,
    with ignored labels and an upstream gradient that is not 1."""
    if path != "fused":
        monkeypatch.setattr(loss_mod, "loss_path", lambda n, c, *a: "chunked" if path == "chunked" else "full")
    ref = _loss_and_grads(None, scale=2.5, reference=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. an out= tensor of the wrong shape resized behind our back
        mine = _loss_and_grads(chunk, scale=2.5)
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", ["head", "hidden", "none"])
def test_fused_loss_makes_only_the_gradients_asked_for(frozen, bias):
    """The gradients that are needed equal autograd's on the full logits; the others are neither computed
    nor held (the Function saves None for them)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 8, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 13, bias=bias, dtype=torch.float64).requires_grad_(frozen != "head")
    ref_head = torch.nn.Linear(8, 13, bias=bias, dtype=torch.float64).requires_grad_(frozen != "head")
    ref_head.load_state_dict(head.state_dict())
    labels = torch.randint(0, 13, (2, 9), generator=g)
    h, ref_h = (hidden.clone().requires_grad_(frozen != "hidden") for _ in range(2))
    out = loss_mod.LinearCrossEntropy.apply(
        h[:, :-1].reshape(-1, 8), head.weight, head.bias, labels[:, 1:].reshape(-1), 4
    )
    saved_h, saved_w, saved_b = out.grad_fn.saved_tensors
    assert (saved_h is None) == (frozen == "hidden")
    assert (saved_w is None) == (frozen == "head") and (saved_b is None) == (frozen == "head" or not bias)
    out.backward()
    ref = F.cross_entropy(ref_head(ref_h[:, :-1]).reshape(-1, 13), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=0)
    pairs = [(h, ref_h), (head.weight, ref_head.weight)] + ([(head.bias, ref_head.bias)] if bias else [])
    for mine, theirs in pairs:
        if theirs.requires_grad:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-14)
        else:
            assert mine.grad is None


def test_fused_loss_backward_twice_with_retain_graph():
    """The saved gradients are scaled out of place: a second backward gives the same gradients again."""
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 13, dtype=torch.float64)
    loss = chunked_causal_lm_loss(hidden, head, torch.randint(0, 13, (2, 9)), 4)
    (first,) = torch.autograd.grad(3 * loss, hidden, retain_graph=True)
    (second,) = torch.autograd.grad(3 * loss, hidden)
    assert torch.equal(first, second)


def test_fused_loss_ignores_nan_in_ignored_rows():
    """A NaN hidden state at a position whose label is -100 adds nothing to the loss, and its row of the
    hidden-state gradient is 0 (autograd's log-softmax backward makes that row NaN); every other row
    equals autograd on the full logits."""
    hidden = torch.randn(1, 6, 4, dtype=torch.float64)
    hidden[0, 2] = float("nan")
    labels = torch.randint(0, 7, (1, 6))
    labels[0, 3] = -100  # the label of position 2 (shifted)
    out = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_(True)
        torch.manual_seed(0)
        head = torch.nn.Linear(4, 7, dtype=torch.float64)
        if fused:
            loss = chunked_causal_lm_loss(h, head, labels, 2)
        else:
            logits = head(h[:, :-1]).reshape(-1, 7)
            loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        out.append((loss.detach(), h.grad))
    (loss, grad), (ref_loss, ref_grad) = out
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[0, 2] == 0).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    rows = [0, 1, 3, 4, 5]
    torch.testing.assert_close(grad[0, rows], ref_grad[0, rows], rtol=1e-12, atol=1e-14)


def test_fused_loss_allocates_one_logits_buffer():
    """However many chunks, forward + backward create a single (chunk, V) tensor (the reused buffer); the
    checkpointed path creates several per chunk. Counted at the dispatcher, fresh storages only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fresh(TorchDispatchMode):
        def __init__(self, big):
            super().__init__()
            self.big, self.count = big, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {
                t.untyped_storage().data_ptr()
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() >= self.big and t.untyped_storage().data_ptr() not in seen:
                    self.count += 1
            return out

    hidden = torch.randn(4, 33, 8, requires_grad=True)
    head = torch.nn.Linear(8, 500, bias=False)
    labels = torch.randint(0, 500, (4, 33))
    counts = {}
    for dtype in (torch.float32, torch.bfloat16):  # bf16 takes the checkpointed path
        h, w = hidden.detach().to(dtype).requires_grad_(True), head.to(dtype)
        with Fresh(16 * 500) as mode:
            chunked_causal_lm_loss(h, w, labels, 16).backward()  # 128 tokens: 8 chunks
        counts[dtype] = mode.count
    assert counts[torch.float32] == 1
    assert counts[torch.bfloat16] >= 8 * 3


def test_low_precision_chunked_loss_agrees_with_full():
    full = _loss_and_grads(chunk=1000, dtype=torch.bfloat16)
    chunked = _loss_and_grads(chunk=7, dtype=torch.bfloat16)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_one_chunk_evaluates_the_head_once(monkeypatch):
    calls = _count_head_evaluations(monkeypatch)
    _loss_and_grads(chunk=30, dtype=torch.bfloat16)  # 3 * 10 = 30 shifted tokens: one chunk
    assert calls == [30]  # no recompute in the backward


def test_beyond_one_chunk_recomputes_each_chunk(monkeypatch):
    calls = _count_head_evaluations(monkeypatch)
    _loss_and_grads(chunk=16, dtype=torch.bfloat16)  # 30 tokens: chunks of 16 and 14, rebuilt in the backward
    assert sorted(calls) == [14, 14, 16, 16]


@pytest.mark.parametrize("chunk, expected", [(64, [38]), (16, [16, 16, 6] * 2)])
def test_model_loss_picks_path_by_chunk_size(monkeypatch, chunk, expected):
    """Under autocast the model's loss takes the full logits or the checkpointed chunks; in fp32 the fused path."""
    calls = _count_head_evaluations(monkeypatch)
    model = tiny_model(loss_chunk_size=chunk)
    ids = torch.randint(0, 97, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids).loss.backward()
    assert sorted(calls) == sorted(expected)
    calls.clear()
    model(ids, labels=ids).loss.backward()
    assert calls == []


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
