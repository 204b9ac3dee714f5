"""The reversible engine: one autograd Function over the whole stack of layers.

Shape legend: B batch, T tokens, D width. The streams x, y, z are all (B, T, D).

Forward (no graph): (x, y) -> ... -> (x_L, y_L) with ``z = dynamics.step(j, x, y, f_j(y))``;
only the final pair is saved.

Backward, layer L..1 (and each ``part`` of a layer, in reverse): with the held pair (y, z) and their
gradients (g_y, g_z), evaluate f_j(y) ONCE with grad enabled. That one evaluation
  * reconstructs x = dynamics.inverse(j, y, z, f_j(y)), and
  * back-propagates C g_z through f_j: into y (J^T) and straight into the block's parameters' .grad.
Then g_x = A g_z and g_y += B g_z + C J^T g_z, and the pair moves down to (x, y). The local graph is
freed before the next layer, so memory is one layer's working set plus the streams.

Exact mode (``Stack.exact_bits``): the held streams are int64 fixed point (``streams.FixedStreams``),
so the reconstruction is bit-identical; blocks see the decoded float stream and gradients pass straight
through the rounding (they are the float model's gradients on the fixed-point trajectory). Its stored
reference (``store=True``) runs the identical forward but keeps each evaluation's graph instead of
recomputing it: the backward arithmetic is the same code, so the two agree bit for bit exactly when
the reconstruction is exact.

The engine owns the layer loop: ``walk`` is the one stepping routine, and every evaluation path goes
through it -- the memory-free and stored forwards here, KV-cached inference (``Stack.layer_kwargs``
gives each layer its cache slot) and per-layer activation checkpointing (``Stack.checkpoint``).

The engine knows nothing about attention: a block is any module called as
``block(y, part=part, **block_kwargs, **layer_kwargs(j))`` returning f(y) (or the named part of it).
Parameter gradients are accumulated into ``.grad`` during the backward, as reentrant activation
checkpointing does; ``torch.autograd.grad`` on parameters therefore does not see them.

Per-layer terms (``Stack.layer_loss``): a loss on the state after each layer (e.g. matching a teacher's
hidden states at every depth). The forward sums ``layer_loss(j, z_j)`` without a graph and returns the
sum as a third output; the backward, on reaching layer j, recomputes that term from the state it holds
and adds its gradient to g_z before stepping through the layer. Nothing more is kept per layer.

Stored layers (``dynamics.stored_layers``): a layer whose rule is the plain residual step (A = 0) cannot
be reconstructed; its older input stream is kept (one stream per stored substep, counted by
``save_for_backward``), so memory is O(1) in depth plus that constant.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import rng
from .drift import DriftMonitor, relative_error
from .streams import make_streams


@dataclass
class Stack:
    """Everything the engine needs besides the two input streams."""

    blocks: Sequence[nn.Module]
    dynamics: Any  # revllm.dynamics.Dynamics
    block_kwargs: dict = field(default_factory=dict)
    preserve_rng: bool = False  # dropout active: replay each evaluation's RNG state
    exact_bits: int | None = None  # int64 fixed-point streams with this many fraction bits; None: float
    monitor: DriftMonitor | None = None  # reconstruction drift (always-on bottom check, debug per layer)
    # Fixed-point initial state x_0 = y_0 - h f_0(y_0), built from the first layer's own evaluation
    # (one f_0 per pass instead of two); run_stack then takes x = None. Only for one-part dynamics.
    initial_h: float | None = None
    # Extra kwargs of layer j's block (a KV cache's slot); only where each layer is evaluated once
    # (a memory-free or checkpointed backward would recompute it, extending a cache twice).
    layer_kwargs: Callable[[int], dict] | None = None
    # Per-layer activation checkpointing of the stored float path: checkpoint(fn, *args) -> fn(*args)
    # (HF's ``_gradient_checkpointing_func``).
    checkpoint: Callable | None = None
    # Per-layer term: layer_loss(j, z) -> 0-d tensor on the newest stream z after layer j (float). When set,
    # run_stack returns (x_L, y_L, sum_j layer_loss(j, z_j)); gradients of the sum flow through the stack.
    layer_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None

    def substeps(self):
        """(layer index, block, part) in forward order."""
        for j, block in enumerate(self.blocks):
            for part in self.dynamics.parts:
                yield j, block, part

    def f(self, block, part, y, j=None):
        """f_j(y) (or its ``part``): the block with the shared kwargs and layer j's own."""
        if self.layer_kwargs is None or j is None:
            return block(y, part=part, **self.block_kwargs)
        return block(y, part=part, **self.block_kwargs, **self.layer_kwargs(j))

    def ends_layer(self, part) -> bool:
        """Whether substep ``part`` completes its layer (where a layer_loss term is read)."""
        return part == self.dynamics.parts[-1]

    def stored(self, j) -> bool:
        return j in self.dynamics.stored_layers


def walk(stack: Stack, streams, x, y, evaluate=None, states: list | None = None, layer: int | None = None, after=None):
    """The layer loop, the one stepping routine of every evaluation path. For each (layer j, part):

        fy = evaluate(i, j, block, part, decode(Y));   (X, Y) <- (Y, step(j, X, Y, fy))

    on the held streams (``streams``: floats, or int64 fixed point; ``x``, ``y`` are encoded first).
    ``x=None`` builds the fixed-point initial state x_0 = y_0 - h f_0(y_0) from the first evaluation.
    ``evaluate`` (default: ``stack.f`` with the layer's kwargs) is how a path evaluates a block (kept
    graph, RNG capture); ``states`` receives the older held stream of each step (the drift reference);
    ``layer`` restricts the walk to one layer (checkpointing); ``after(i, j, part, X, Z)`` sees each step's
    older input X and new state Z (stored layers' inputs, per-layer terms). The substep index i counts
    from the first layer either way. Returns (X, Y, sides, x0): the final held pair, each step's side data for
    the inverse, and the float initial state."""
    evaluate = evaluate or (lambda i, j, block, part, yf: stack.f(block, part, yf, j))
    X, Y = (None if x is None else streams.encode(x)), streams.encode(y)
    sides = []
    for i, (j, block, part) in enumerate(stack.substeps()):
        if layer is not None and j != layer:
            continue
        fy = evaluate(i, j, block, part, streams.decode(Y, y.dtype))
        if X is None:  # fused initial state (kept in float for the drift check)
            x = initial_state(y, fy, stack.initial_h)
            X = streams.encode(x)
        if states is not None:
            states.append(X.clone())  # debug: the state the backward will reconstruct
        Z, side = streams.step(j, X, Y, fy)
        sides.append(side)
        if after is not None:
            after(i, j, part, X, Z)
        X, Y = Y, Z
    return X, Y, sides, x


def run_stack(x: torch.Tensor, y: torch.Tensor, stack: Stack, memory_free: bool):
    """Advance the pair (x, y) through every layer; returns the final pair (x_L, y_L).

    ``memory_free=True`` uses the reversible backward; ``False`` is the identical arithmetic with all
    activations stored, the reference the engine is tested against (ordinary autograd for float
    streams; the engine with kept graphs for fixed-point streams, which autograd cannot carry).
    With ``stack.initial_h`` set, ``x`` is None and the first layer's evaluation also builds x_0.
    """
    if (x is None) != (stack.initial_h is not None):
        raise ValueError("run_stack: pass x=None exactly when stack.initial_h builds the initial state")
    if stack.layer_kwargs is not None and (memory_free or stack.checkpoint is not None):
        # A recomputing backward would evaluate each layer twice, e.g. extend a KV cache twice.
        raise ValueError(
            "run_stack: per-layer kwargs are for paths that evaluate each layer once "
            "(not memory_free, not checkpointed)"
        )
    if not memory_free and stack.checkpoint is not None:
        return _checkpointed(x, y, stack)
    if stack.layer_loss is not None and stack.checkpoint is not None:
        raise ValueError("run_stack: layer_loss is not supported with per-layer activation checkpointing")
    if not memory_free and stack.exact_bits is None:  # ordinary autograd through the float streams
        terms = []

        def term(i, j, part, X, Z):
            if stack.layer_loss is not None and stack.ends_layer(part):
                terms.append(stack.layer_loss(j, Z))

        x, y, _, _ = walk(stack, make_streams(stack.dynamics, None), x, y, after=term)
        return (x, y) if stack.layer_loss is None else (x, y, _sum(terms, y))
    # Function outputs require grad only if an input does: anchor the parameters' gradients when
    # the streams themselves need none (e.g. frozen embeddings under LoRA).
    needs_anchor = (
        not ((x is not None and x.requires_grad) or y.requires_grad)
        and torch.is_grad_enabled()
        and any(p.requires_grad for b in stack.blocks for p in b.parameters())
    )
    anchor = torch.empty(0, requires_grad=True) if needs_anchor else None
    store = not memory_free and torch.is_grad_enabled()
    monitor = stack.monitor if memory_free else None  # drift exists only where states are reconstructed
    return ReversibleStackFunction.apply(x, y, anchor, stack, store, monitor)


def _checkpointed(x, y, stack: Stack):
    """Stored path with per-layer activation checkpointing (HF's gradient checkpointing), one ``walk``
    per layer. It runs float streams: autograd cannot carry gradients through int64 fixed point, so
    in exact mode this is the float trajectory (rounding-level different from the exact one)."""
    if stack.exact_bits is not None:
        warnings.warn(
            "activation checkpointing runs float streams; exact_reversal's fixed-point "
            "trajectory is kept by memory_free=True or by the stored path without checkpointing"
        )
    streams = make_streams(stack.dynamics, None)

    def layer(j, block, x, y):  # ``block`` is passed so that the checkpoint sees the layer it recomputes
        x, y, _, _ = walk(stack, streams, x, y, layer=j)
        return x, y

    for j, block in enumerate(stack.blocks):
        x, y = stack.checkpoint(layer, j, block, x, y)
    return x, y


def initial_state(y, fy, h):
    """x_0 = y_0 - h f_0(y_0), the residual update inverted to first order (in the stream dtype)."""
    return y - h * fy.to(y.dtype)


class ReversibleStackFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, anchor, stack: Stack, store: bool = False, mon: DriftMonitor | None = None):
        streams = make_streams(stack.dynamics, stack.exact_bits)
        dev, dtype = y.device, y.dtype
        rng_states, kept = [], []
        states = [] if mon is not None and mon.per_layer else None
        kept_x, kept_loss, terms = {}, {}, []  # stored layers' inputs; the stored reference's layer terms
        # The autocast weight-cast cache would keep a low-precision copy of every layer's weights
        # alive until the outer autocast exits, so peak memory would grow with depth: disable it.
        ctx.autocast = dict(
            device_type=dev.type,
            enabled=torch.is_autocast_enabled(dev.type),
            dtype=torch.get_autocast_dtype(dev.type),
            cache_enabled=False,
        )

        def evaluate(i, j, block, part, yf):
            if not store:
                if stack.preserve_rng:
                    rng_states.append(rng.capture(dev))
                return stack.f(block, part, yf, j)
            y_in = yf.detach().requires_grad_(True)  # reference: keep this evaluation's graph for the backward
            with torch.enable_grad():
                fy = stack.f(block, part, y_in, j)
            kept.append((y_in, fy))
            return fy.detach()

        def after(i, j, part, X, Z):
            if stack.stored(j) and not store:
                kept_x[i] = X  # a residual step cannot be inverted: keep its older input
            if stack.layer_loss is not None and stack.ends_layer(part):
                term = _layer_term(stack, j, streams.decode(Z, dtype), keep_graph=store)
                if store:
                    kept_loss[i], term = term, term[1]
                terms.append(term.detach())

        with torch.autocast(**ctx.autocast):
            X, Y, sides, x = walk(stack, streams, x, y, evaluate, states, after=after)
        streams.check()
        ctx.stack, ctx.streams, ctx.store, ctx.mon = stack, streams, store, mon
        ctx.rng_states, ctx.sides, ctx.kept, ctx.states = rng_states, sides, kept, states or []
        ctx.dtype = dtype
        ctx.kept_loss, ctx.kept_x_at, ctx.n_inputs = kept_loss, list(kept_x), 2 if mon is not None else 0
        # With a monitor the inputs are kept for the bottom-state drift check (one more stream, or none
        # extra beyond the embedding output when x is y under the default "copy" initial state).
        ctx.save_for_backward(X, Y, *((x, y) if mon is not None else ()), *kept_x.values())
        out = (X, Y) if not streams.exact else (streams.decode(X, dtype), streams.decode(Y, dtype))
        return out if stack.layer_loss is None else (*out, _sum(terms, y))

    @staticmethod
    @torch.autograd.function.once_differentiable  # the reconstruction is not itself differentiated
    def backward(ctx, g_y, g_z, g_loss=None):
        return _backward(ctx, g_y, g_z, g_loss)


def _backward(ctx, g_y, g_z, g_loss):
    """The reversible backward (module docstring). A plain function, not the decorated method itself: mutmut
    does not mutate decorated functions, and this is the code mutation testing most needs to reach."""
    stack: Stack = ctx.stack
    dyn, streams = stack.dynamics, ctx.streams
    # The stored reference and the per-layer drift check drop their per-layer state as the backward
    # walks down (that is what keeps the peak flat), so a second backward cannot be served.
    if any(k is None for k in ctx.kept) or any(s is None for s in ctx.states):
        raise RuntimeError(
            "reversible stack: backward through the same forward a second time is not "
            "supported in stored or per-layer-drift mode (its per-layer state was freed by "
            "the first backward, even with retain_graph=True); run the forward again"
        )
    Y, Z, *rest = ctx.saved_tensors  # held pair (older, newest) [, the stack's inputs] [, stored inputs]
    inputs, kept_x = rest[: ctx.n_inputs], dict(zip(ctx.kept_x_at, rest[ctx.n_inputs :]))
    mon = ctx.mon
    per_layer = mon is not None and mon.per_layer and bool(ctx.states)
    zeros = lambda: torch.zeros(Y.shape, dtype=ctx.dtype, device=Y.device)  # noqa: E731
    g_y = zeros() if g_y is None else g_y
    g_z = zeros() if g_z is None else g_z
    steps = list(stack.substeps())
    want_input_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    rels, fell_back = [], False
    with torch.autocast(**ctx.autocast):
        for i in range(len(steps) - 1, -1, -1):
            j, block, part = steps[i]
            a, b, c = dyn.layer_coefficients(j)
            if stack.layer_loss is not None and g_loss is not None and stack.ends_layer(part):
                z = None if ctx.store else streams.decode(Z, ctx.dtype)
                g_z = g_z + _layer_grad(ctx, stack, i, j, z, g_loss).to(g_z.dtype)
            if ctx.store:
                y_in, fy = ctx.kept[i]
                ctx.kept[i] = None
            else:
                # At the bottom the held y is an input stream: skip its vector-Jacobian product
                # when the caller needs no input gradient.
                need_gy = i > 0 or want_input_grad
                y_in = streams.decode(Y, ctx.dtype).detach().requires_grad_(need_gy)
                with torch.enable_grad():
                    if stack.preserve_rng:
                        with rng.replay(ctx.rng_states[i], y_in.device):
                            fy = stack.f(block, part, y_in, j)
                    else:
                        fy = stack.f(block, part, y_in, j)
                X = kept_x.pop(i) if i in kept_x else streams.inverse(j, Y, Z, fy.detach(), ctx.sides[i])
                if per_layer:
                    ref = ctx.states[i]
                    rels.append(relative_error(X, ref))
                    if fell_back or (mon.fallback and mon.exceeded(rels[-1])):
                        fell_back, X = True, ref  # continue from the stored states
                    ctx.states[i] = None
            g_x = _mul(a, g_z)
            g_f = _mul(c, g_z)
            if i == 0 and stack.initial_h is not None:
                # x_0 = y_0 - h f_0(y_0) came from this very evaluation: one VJP carries both uses.
                g_f = g_f - stack.initial_h * g_x
            if fy.requires_grad:
                torch.autograd.backward(fy, g_f.to(fy.dtype))
            del fy  # frees this layer's graph before the next
            g_in = y_in.grad if y_in.requires_grad else None
            if i == 0 and stack.initial_h is not None:
                g_in = g_x if g_in is None else g_in.to(g_x.dtype) + g_x  # dx_0/dy_0 = I
                g_x = None
            g_y_new = g_y if g_in is None else g_in.to(g_y.dtype).add_(g_y)
            if torch.is_tensor(b) or b != 0:  # (a 0-d tensor coefficient always contributes)
                g_y_new = g_y_new + _mul(b, g_z)
            if not ctx.store:
                Y, Z = X, Y
            g_y, g_z = g_x, g_y_new
    if mon is not None:
        _report(mon, streams, (Y, Z), inputs, rels, fell_back)
    # g_y, g_z are now the gradients of the input pair (x_0, y_0).
    return (
        g_y if ctx.needs_input_grad[0] else None,
        g_z if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
        None,
    )


def _sum(terms, like):
    """Sum of the per-layer terms (0 when there are none)."""
    return torch.stack(terms).sum() if terms else like.new_zeros(())


def _layer_term(stack: Stack, j: int, z: torch.Tensor, keep_graph: bool):
    """layer_loss(j, z): the value (no graph), or (z_in, value with graph) for the stored reference."""
    if not keep_graph:
        return stack.layer_loss(j, z)
    z_in = z.detach().requires_grad_(True)
    with torch.enable_grad():
        return z_in, stack.layer_loss(j, z_in)


def _layer_grad(ctx, stack: Stack, i: int, j: int, z, g_loss):
    """g_loss * d layer_loss(j, z) / dz at substep i: recomputed from the held state (memory-free), or from
    the graph the stored reference kept."""
    if ctx.store:
        z_in, term = ctx.kept_loss.pop(i)
    else:
        z_in, term = _layer_term(stack, j, z, keep_graph=True)
    (g,) = torch.autograd.grad(term, z_in, grad_outputs=g_loss.to(term.dtype))
    return g


def _report(mon: DriftMonitor, streams, rec, inputs, rels, fell_back):
    """Bottom-state check (always) and per-layer errors (debug) into the monitor."""
    ref = [streams.encode(t.detach()) for t in inputs]
    mon.record_bottom(torch.maximum(relative_error(rec[0], ref[0]), relative_error(rec[1], ref[1])))
    if rels:
        mon.record_layers(rels)
        if any(r > mon.threshold for r in mon.last_per_layer if mon.threshold is not None):
            worst = max(mon.last_per_layer)
            warnings.warn(
                f"reversible backward: per-layer drift {worst:.3g} > drift_threshold {mon.threshold:g}"
                + ("; fell back to the stored states for this step" if fell_back else "")
            )
    mon.fallbacks += int(fell_back)


def _mul(coef, t):
    if not torch.is_tensor(coef) and coef == 1:
        return t
    return coef * t
