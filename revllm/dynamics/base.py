"""The dynamics protocol: one residual-update rule, its exact inverse, and the registry.

Every rule carries a pair of streams ``(x, y)`` = (older, newer) and advances it by

    z = A_j * x + B_j * y + C_j * f_j(y)            (two-step form, paper section 3)
    (x, y) -> (y, z)

so ``inverse`` recovers ``x = (z - B_j y - C_j f_j(y)) / A_j`` from the pair ``(y, z)`` that the
backward pass still holds, evaluating ``f_j`` only at ``y``. A rule is reversible iff ``A_j != 0``.

A layer may apply the rule more than once with different parts of the block (``parts``): the
Hamiltonian rule (eqs. 2.8-2.9) is two such half-steps, one with the attention branch and one with
the MLP branch. The engine only ever sees ``parts``, ``coefficients``, ``step`` and ``inverse``.

One way to define a rule: a subclass sets ``name``/``reversible``/``parts`` and implements
``coefficients(j)``, nothing else. ``step``, ``inverse`` and their fixed-point variants
(``step_exact``, ``inverse_exact``) are derived here from the coefficients and are final: the
memory-free backward never calls ``step``, it back-propagates with the coefficients themselves
(g_x = A g_z, g_y += B g_z + C J^T g_z), so a rule whose ``step`` computed anything else would train
with silently wrong gradients. ``__init_subclass__`` refuses such a subclass when it is defined.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fixedpoint as fxp

DYNAMICS: dict[str, type[Dynamics]] = {}


def register(cls: type[Dynamics]) -> type[Dynamics]:
    """Class decorator: make a rule available under ``cls.name``."""
    DYNAMICS[cls.name] = cls
    return cls


class Dynamics(nn.Module):
    """Base class. Subclasses set ``name``/``reversible``/``parts`` and implement ``coefficients`` only.

    It is an ``nn.Module`` so that per-layer coefficients (midpoint_a's ``a``) are persistent buffers
    saved with the weights.
    """

    name: str = ""
    reversible: bool = True
    # Derived from ``coefficients`` and used together with them by the engine: not to be overridden.
    FINAL = ("step", "inverse", "step_exact", "inverse_exact", "_exact_rest")
    parts: tuple[str, ...] = ("full",)  # block parts evaluated in order, one half-step each
    default_step_size: float = 1.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        overridden = [m for m in Dynamics.FINAL if m in vars(cls)]
        if overridden:
            raise TypeError(
                f"dynamics {cls.__name__} overrides {', '.join(overridden)}: a rule defines only coefficients(j) "
                f"(and parts); step/inverse are derived from the coefficients because the memory-free backward "
                f"uses them directly, so an overridden step would train with wrong gradients"
            )

    def __init__(self, config):
        super().__init__()
        self.num_layers = config.num_hidden_layers
        self.h = float(config.step_size)
        # Per-layer rule (issue 14): a stored layer takes the plain residual step z = y + f(y) (A=0, B=1,
        # C=1, the pretrained layer itself); the engine keeps its older input instead of reconstructing it.
        self.stored_layers = frozenset(getattr(config, "stored_layers", None) or ())

    def layer_coefficients(self, j: int):
        """(A, B, C) actually used at layer ``j``: the rule's, or the residual step's for a stored layer."""
        return (0.0, 1.0, 1.0) if j in self.stored_layers else self.coefficients(j)

    def coefficients(self, j: int):
        """(A, B, C) of layer ``j``: python floats or 0-d tensors. The one method a rule implements."""
        raise NotImplementedError

    def step(self, j: int, x: torch.Tensor, y: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
        """z = A x + B y + C f(y). Streams stay in their own dtype (fp32 under autocast)."""
        a, b, c = self.layer_coefficients(j)
        z = _scaled(c, fy.to(y.dtype))
        if not _is_zero(a):
            z = z + _scaled(a, x)
        if not _is_zero(b):
            z = z + _scaled(b, y)
        return z

    def inverse(self, j: int, y: torch.Tensor, z: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
        """x = (z - B y - C f(y)) / A, the exact algebraic inverse of ``step``."""
        a, b, c = self.layer_coefficients(j)
        if not self.reversible or j in self.stored_layers:
            raise RuntimeError(f"dynamics '{self.name}' layer {j} is not reversible (stored layers keep their input)")
        r = z - _scaled(c, fy.to(y.dtype))
        if not _is_zero(b):
            r = r - _scaled(b, y)
        return r if _is_one(a) else r / a

    # -- exact reversal (int64 fixed-point streams) ---------------------------------------------------
    def check_exact(self) -> int:
        """Raise ``ValueError`` unless every layer's A is dyadic (m / 2^k, k <= 16) and nonzero.

        Returns the largest integer multiplier applied to a stream (for the int64 headroom check)."""
        if not self.reversible:
            raise ValueError(f"exact_reversal needs a reversible dynamics; '{self.name}' is not")
        growth = 4
        for j in range(self.num_layers):
            if j in self.stored_layers:  # residual step on held integers: Y + round(f); input kept, not rebuilt
                continue
            a, b, _ = (float(v) for v in self.coefficients(j))
            d = fxp.dyadic(a)
            if d is None or a == 0:
                raise ValueError(
                    f"exact_reversal needs a dyadic coefficient A = m/2^k (k <= {fxp.MAX_DYADIC_BITS}) in "
                    f"'{self.name}' layer {j}, got {a!r}; nearest dyadic: {fxp.nearest_dyadic(a, 4)} with "
                    f"k=4, {fxp.nearest_dyadic(a, fxp.MAX_DYADIC_BITS)} with k={fxp.MAX_DYADIC_BITS}"
                )
            db = fxp.dyadic(b)
            growth = max(growth, abs(d[0]), abs(db[0]) if db else int(abs(b)) + 1)
        return growth

    def _exact_rest(self, Y, fy, b, c, bits):
        """round(B y) + round(C f(y)): a deterministic integer function of what the backward holds."""
        r = fxp.fixed_scaled(float(c), fy, bits)
        if not _is_zero(b):
            r = r + fxp.fixed_mul(float(b), Y)
        return r

    def step_exact(self, j: int, X: torch.Tensor, Y: torch.Tensor, fy: torch.Tensor, bits: int):
        """Fixed-point step: Z = floor(m X / 2^k) + round(B Y) + round(C f(y)).

        Returns (Z, low) where ``low`` holds the k dropped bits of m X packed (None when k = 0)."""
        a, b, c = self.layer_coefficients(j)
        if j in self.stored_layers:  # A = 0: X is not read (the engine keeps it)
            return self._exact_rest(Y, fy, b, c, bits), None
        m, k = fxp.dyadic(float(a))
        mX = X if m == 1 else X * m
        rest = self._exact_rest(Y, fy, b, c, bits)
        if k == 0:
            return mX + rest, None
        return (mX >> k) + rest, fxp.pack_bits(mX & ((1 << k) - 1), k)

    def inverse_exact(self, j: int, Y: torch.Tensor, Z: torch.Tensor, fy: torch.Tensor, low, bits: int):
        """Bit-exact inverse of ``step_exact``: m X = ((Z - rest) << k) + low, then X = m X / m."""
        if j in self.stored_layers:
            raise RuntimeError(f"dynamics '{self.name}' layer {j} is stored: its input is kept, not reconstructed")
        a, b, c = self.coefficients(j)
        m, k = fxp.dyadic(float(a))
        mX = Z - self._exact_rest(Y, fy, b, c, bits)
        if k:
            mX = (mX << k) + fxp.unpack_bits(low, k, Z.shape)
        # m divides m X exactly (it was formed as m * X), so truncating division is exact.
        return mX if m == 1 else torch.div(mX, m, rounding_mode="trunc")

    def extra_repr(self) -> str:
        return f"name={self.name}, h={self.h}, layers={self.num_layers}"


def _is_zero(v) -> bool:
    return not torch.is_tensor(v) and v == 0


def _is_one(v) -> bool:
    return not torch.is_tensor(v) and v == 1


def _scaled(coef, t: torch.Tensor) -> torch.Tensor:
    # Skip multiplications by exactly 1 so midpoint/hamiltonian add f(y) without an extra rounding.
    if _is_one(coef):
        return t
    return coef * t
