"""Midpoint rules.

midpoint (eq. 2.4):    p_{j+1} = p_{j-1} + 2h f_j(p_j)                      A=1, B=0,     C=2h
midpoint_a (eq. 3.6):  p_{j+1} = a_j p_{j-1} + (1-a_j) p_j + h f_j(p_j)      A=a_j, B=1-a_j, C=h

midpoint_a's coefficient a_j is a persistent buffer (saved with the weights). By default it is drawn
once at initialization as a_j = s_j + u_j, s_j = +-1 with probability 1/2, u_j ~ U(-1/2, 1/2), from a
generator seeded with ``config.midpoint_a_seed``; ``config.midpoint_a`` may instead give one constant
or a per-layer list. Reconstruction divides by a_j, so float error grows by 1/|a_j| per layer: the
config enforces |a_j| >= ``midpoint_a_floor`` unless reversal is exact. Exact reversal needs dyadic
a_j = m_j / 2^k_j; ``config.midpoint_a_dyadic_bits = k`` rounds the random draw to that grid.
"""

import torch

from .base import Dynamics, register


@register
class Midpoint(Dynamics):
    name = "midpoint"
    default_step_size = 0.5  # 2h = 1 matches the residual scale of a standard block

    def coefficients(self, j):
        return 1.0, 0.0, 2.0 * self.h


@register
class MidpointA(Dynamics):
    name = "midpoint_a"

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("a", torch.tensor(draw_midpoint_a(config), dtype=torch.float64), persistent=True)
        self._a_cache = None

    def coefficients(self, j):
        # Python floats: no device sync per layer, and the buffer is read once per forward.
        if self._a_cache is None or len(self._a_cache) != self.a.numel():
            self._a_cache = self.a.tolist()
        a = self._a_cache[j]
        return a, 1.0 - a, self.h

    def _apply(self, fn, recurse=True):
        # model.to(bf16) / .half() would round the coefficients (and the cache would keep the old
        # ones): move them to the new device only, in float64.
        a = self.a.detach().clone()
        out = super()._apply(fn, recurse)
        self.a = a.to(device=self.a.device)
        self._a_cache = None
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._a_cache = None  # a loaded checkpoint replaces the coefficients
        super()._load_from_state_dict(*args, **kwargs)


def draw_midpoint_a(config) -> list[float]:
    """The per-layer coefficients a_j, from the config (constant, list, or seeded random draw)."""
    n = config.num_hidden_layers
    given = config.midpoint_a
    if given is None:
        g = torch.Generator().manual_seed(int(config.midpoint_a_seed))
        # Explicit CPU: model construction may run under a meta-device context.
        sign = torch.where(torch.rand(n, generator=g, dtype=torch.float64, device="cpu") < 0.5, -1.0, 1.0)
        u = torch.rand(n, generator=g, dtype=torch.float64, device="cpu") - 0.5
        a = sign + u
        k = getattr(config, "midpoint_a_dyadic_bits", None)
        if k is not None:  # quantize to m / 2^k so exact reversal applies (|a| >= 1/2 stays nonzero)
            a = torch.round(a * 2**k) / 2**k
        return a.tolist()
    if isinstance(given, (int, float)):
        return [float(given)] * n
    return [float(v) for v in given]
