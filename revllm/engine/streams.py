"""How the engine holds the residual streams: as floats (default) or as int64 fixed point (exact).

Both expose the same four operations, so the engine's loop is written once:
  encode(t) / decode(s): float tensor <-> held stream (identity for floats);
  step(j, X, Y, fy) -> (Z, side):   the dynamics' update on held streams, plus what the inverse needs
                                    besides (y, z) (midpoint_a's k dropped bits in exact mode);
  inverse(j, Y, Z, fy, side) -> X.
Blocks always see decode(Y) in the input's float dtype (fp32 streams under autocast).
"""

from __future__ import annotations

import torch

from ..dynamics import fixedpoint as fxp


class FloatStreams:
    exact = False

    def __init__(self, dynamics):
        self.dyn = dynamics

    def encode(self, t):
        return t

    def decode(self, s, dtype):
        return s

    def step(self, j, X, Y, fy):
        return self.dyn.step(j, X, Y, fy), None

    def inverse(self, j, Y, Z, fy, side):
        return self.dyn.inverse(j, Y, Z, fy)

    def check(self):
        pass


class FixedStreams:
    """int64 streams with ``bits`` fractional bits; tracks the peak magnitude for the headroom check."""

    exact = True

    def __init__(self, dynamics, bits: int):
        self.dyn, self.bits = dynamics, bits
        self.growth = dynamics.check_exact()  # refuses non-dyadic coefficients before any work
        self.peaks: list[torch.Tensor] = []

    def encode(self, t):
        fxp.check_headroom(float(t.detach().abs().amax()) * 2.0**self.bits * self.growth, self.bits, "the input stream")
        return fxp.to_fixed(t.detach(), self.bits)

    def decode(self, s, dtype):
        return fxp.to_float(s, self.bits, dtype)

    def step(self, j, X, Y, fy):
        Z, low = self.dyn.step_exact(j, X, Y, fy, self.bits)
        # Lazy device-side maxima, checked once per forward (no sync per layer).
        # aminmax, not abs: abs(-2^63) wraps to itself in int64.
        lo, hi = torch.aminmax(Z)
        self.peaks.append(torch.maximum(hi.to(torch.float64), -lo.to(torch.float64)))
        return Z, low

    def inverse(self, j, Y, Z, fy, side):
        return self.dyn.inverse_exact(j, Y, Z, fy, side, self.bits)

    def check(self):
        """Raise if any stream could have left int64 range (products by up to ``growth`` included)."""
        if self.peaks:
            fxp.check_headroom(float(torch.stack(self.peaks).amax()) * self.growth, self.bits, "a stream")
            self.peaks = []


def make_streams(dynamics, exact_bits: int | None):
    return FloatStreams(dynamics) if exact_bits is None else FixedStreams(dynamics, exact_bits)
