"""The engine owns the layer loop: every evaluation path steps through ``engine.function.walk``."""

import ast
import pathlib

import pytest
import torch
from conftest import tiny_model

import revllm.engine.function as engine_function


@pytest.fixture
def walks(monkeypatch):
    """Records the ``walk`` calls (keyword ``layer`` or None) of whatever runs inside the test."""
    calls = []
    real = engine_function.walk

    def spy(*args, **kwargs):
        calls.append(kwargs.get("layer"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_function, "walk", spy)
    return calls


@pytest.mark.parametrize("path", ["memory_free", "stored", "stored_exact", "cached", "cached_exact", "checkpointed"])
def test_every_path_steps_through_the_engine(path, walks):
    exact = path.endswith("_exact")
    kw = dict(dynamics="midpoint_a", midpoint_a=1 / 16, exact_reversal=True) if exact else dict(dynamics="midpoint")
    model = tiny_model(layers=3, memory_free=path == "memory_free", **kw)
    ids = torch.randint(0, 97, (2, 6))
    if path.startswith("cached"):
        model.eval()
        with torch.no_grad():
            model(ids, use_cache=True)
        assert walks == [None]
        return
    if path == "checkpointed":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model(ids, labels=ids).loss.backward()
    # checkpointed: one walk per layer forward, and again top-down as the backward recomputes each layer
    assert walks == ([0, 1, 2, 2, 1, 0] if path == "checkpointed" else [None])
    assert all(p.grad is not None for p in model.model.layers.parameters())


def test_modeling_does_not_step_the_dynamics_itself():
    """No call of a dynamics or streams step/inverse, and no stream codec, in the modeling code."""
    src = pathlib.Path(engine_function.__file__).parent.parent / "modeling" / "modeling_revllm.py"
    called = {
        n.func.attr
        for n in ast.walk(ast.parse(src.read_text()))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    assert not called & {"step", "inverse", "step_exact", "inverse_exact", "encode", "decode", "substeps"}


def test_per_layer_kwargs_are_refused_where_a_layer_would_be_evaluated_twice():
    from revllm.engine import Stack, run_stack

    model = tiny_model(block="gpt2", layers=2, dtype=torch.float64)  # its blocks need no shared kwargs
    stack = Stack(model.model.layers, model.dynamics, {}, layer_kwargs=lambda j: {})
    y = torch.randn(1, 4, 32, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="per-layer kwargs are for paths that evaluate each layer once"):
        run_stack(y, y, stack, memory_free=True)
    out = run_stack(y, y, stack, memory_free=False)[1]  # the stored path takes them
    assert out.shape == y.shape
