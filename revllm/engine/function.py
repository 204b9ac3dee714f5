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

The engine knows nothing about attention: a block is any module called as
``block(y, part=part, **block_kwargs)`` returning f(y) (or the named part of it).
Parameter gradients are accumulated into ``.grad`` during the backward, as reentrant activation
checkpointing does; ``torch.autograd.grad`` on parameters therefore does not see them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from . import rng


@dataclass
class Stack:
    """Everything the engine needs besides the two input streams."""

    blocks: Sequence[nn.Module]
    dynamics: Any  # revllm.dynamics.Dynamics
    block_kwargs: dict = field(default_factory=dict)
    preserve_rng: bool = False  # dropout active: replay each evaluation's RNG state

    def substeps(self):
        """(layer index, block, part) in forward order."""
        for j, block in enumerate(self.blocks):
            for part in self.dynamics.parts:
                yield j, block, part

    def f(self, block, part, y):
        return block(y, part=part, **self.block_kwargs)


def run_stack(x: torch.Tensor, y: torch.Tensor, stack: Stack, memory_free: bool):
    """Advance the pair (x, y) through every layer; returns the final pair (x_L, y_L).

    ``memory_free=True`` uses the reversible backward; ``False`` is the identical arithmetic under
    ordinary autograd (all activations stored), the reference the engine is tested against.
    """
    if not memory_free:
        for j, block, part in stack.substeps():
            x, y = y, stack.dynamics.step(j, x, y, stack.f(block, part, y))
        return x, y
    # Function outputs require grad only if an input does: anchor the parameters' gradients when
    # the streams themselves need none (e.g. frozen embeddings under LoRA).
    needs_anchor = not (x.requires_grad or y.requires_grad) and torch.is_grad_enabled() and any(
        p.requires_grad for b in stack.blocks for p in b.parameters()
    )
    anchor = torch.empty(0, requires_grad=True) if needs_anchor else None
    return ReversibleStackFunction.apply(x, y, anchor, stack)


class ReversibleStackFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, anchor, stack: Stack):
        dyn = stack.dynamics
        dev = y.device
        rng_states = []
        # The autocast weight-cast cache would keep a low-precision copy of every layer's weights
        # alive until the outer autocast exits, so peak memory would grow with depth: disable it.
        ctx.autocast = dict(
            device_type=dev.type,
            enabled=torch.is_autocast_enabled(dev.type),
            dtype=torch.get_autocast_dtype(dev.type),
            cache_enabled=False,
        )
        with torch.autocast(**ctx.autocast):
            for j, block, part in stack.substeps():
                if stack.preserve_rng:
                    rng_states.append(rng.capture(dev))
                x, y = y, dyn.step(j, x, y, stack.f(block, part, y))
        ctx.stack, ctx.rng_states = stack, rng_states
        ctx.save_for_backward(x, y)
        return x, y

    @staticmethod
    def backward(ctx, g_y, g_z):
        stack: Stack = ctx.stack
        dyn = stack.dynamics
        y, z = ctx.saved_tensors  # held pair (older, newest)
        g_y = torch.zeros_like(y) if g_y is None else g_y
        g_z = torch.zeros_like(z) if g_z is None else g_z
        steps = list(stack.substeps())
        want_input_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(**ctx.autocast):
            for i in range(len(steps) - 1, -1, -1):
                j, block, part = steps[i]
                a, b, c = dyn.coefficients(j)
                # At the bottom the held y is an input stream: skip its vector-Jacobian product
                # when the caller needs no input gradient.
                need_gy = i > 0 or want_input_grad
                y_in = y.detach().requires_grad_(need_gy)
                with torch.enable_grad():
                    if stack.preserve_rng:
                        with rng.replay(ctx.rng_states[i], y.device):
                            fy = stack.f(block, part, y_in)
                    else:
                        fy = stack.f(block, part, y_in)
                x = dyn.inverse(j, y, z, fy.detach())
                if fy.requires_grad:
                    torch.autograd.backward(fy, (_mul(c, g_z)).to(fy.dtype))
                del fy  # frees this layer's graph before the next
                g_in = y_in.grad if need_gy else None
                g_x = _mul(a, g_z)
                g_y_new = g_y if g_in is None else g_in.to(g_y.dtype).add_(g_y)
                if not (torch.is_tensor(b) or b == 0):
                    g_y_new = g_y_new + _mul(b, g_z)
                y, z, g_y, g_z = x, y, g_x, g_y_new
        # (y, z) is now the input pair (x_0, y_0) with gradients (g_y, g_z).
        return (g_y if ctx.needs_input_grad[0] else None,
                g_z if ctx.needs_input_grad[1] else None, None, None)


def _mul(coef, t):
    if not torch.is_tensor(coef) and coef == 1:
        return t
    return coef * t
