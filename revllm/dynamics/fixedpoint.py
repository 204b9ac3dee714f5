"""Fixed-point streams for exact reversal: int64 values q = round(v * 2^bits), and the arithmetic on them.

Why integers: float addition is not invertible ((x + f) - f != x in general), so a reconstructed state
differs from the forward's in its last bits, and under bf16 autocast that difference changes the next
block's rounding and compounds with depth. Integer addition is exact: if the forward adds an integer
increment that is a deterministic function of the kept state, the backward recomputes the same integer
and subtracts it, so reconstruction is bit-identical at any depth.

Dyadic coefficients a = m / 2^k keep midpoint_a exact too: floor(m x / 2^k) drops k low bits, which the
forward stores (``pack_bits``, k bits per element) and the backward puts back before dividing by m.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

MAX_DYADIC_BITS = 16  # a = m / 2^k with k <= 16: the low-bit buffer costs at most 2 bytes per element
HEADROOM = 2**62  # int64 values must stay below this; sums of a few such terms still fit in 2^63


def to_fixed(t: torch.Tensor, bits: int) -> torch.Tensor:
    """round(t * 2^bits) as int64. Scaling by a power of two is exact, so this is exact rounding."""
    return (t * float(2**bits)).round().to(torch.int64)


def to_float(q: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """q * 2^-bits in ``dtype`` (int64 -> float rounds to nearest, deterministically)."""
    return q.to(dtype) * float(2.0**-bits)


def check_headroom(peak: float, bits: int, what: str) -> None:
    """Raise if a fixed-point magnitude (in integer units) could overflow int64."""
    if not math.isfinite(peak) or peak >= HEADROOM:
        raise ValueError(
            f"exact_reversal: {what} reaches {peak * 2.0**-bits:.4g}, beyond the int64 headroom "
            f"{HEADROOM * 2.0**-bits:.4g} at exact_fraction_bits={bits}; lower exact_fraction_bits "
            f"(each bit fewer doubles the headroom) or use float streams (exact_reversal=False)"
        )


def dyadic(a: float) -> tuple[int, int] | None:
    """(m, k) with a == m / 2^k exactly, k minimal and <= MAX_DYADIC_BITS; None if there is none."""
    if not math.isfinite(a):
        return None
    fr = Fraction(a)  # exact value of the float
    den = fr.denominator
    if den & (den - 1) or den > 2**MAX_DYADIC_BITS:  # not a power of two, or too fine
        return None
    return fr.numerator, den.bit_length() - 1


def nearest_dyadic(a: float, k: int) -> str:
    """Human-readable nearest m / 2^k to ``a``."""
    m = round(a * 2**k)
    return f"{m / 2**k:.6g} ({m}/{2**k})"


def fixed_mul(coef: float, q: torch.Tensor) -> torch.Tensor:
    """round(coef * q) for a fixed-point tensor q, deterministic: exact integer arithmetic when coef is
    an integer or dyadic, float64 otherwise (same result every time it is recomputed)."""
    d = dyadic(coef)
    if d is None:
        return (q.to(torch.float64) * coef).round().to(torch.int64)
    m, k = d
    if k == 0:
        return q if m == 1 else q * m
    return (q * m + (1 << (k - 1))) >> k  # round half up


def fixed_scaled(coef: float, t: torch.Tensor, bits: int) -> torch.Tensor:
    """round(coef * t * 2^bits) for a float tensor t (a block output). Computed in t's precision
    promoted to at least fp32: bf16 outputs are exactly representable there, and the result only has
    to be a deterministic function of t."""
    work = torch.promote_types(t.dtype, torch.float32)
    return (t.to(work) * (coef * float(2**bits))).round().to(torch.int64)


# -- k-bit buffer --------------------------------------------------------------------------------------
def pack_bits(low: torch.Tensor, k: int) -> torch.Tensor:
    """Pack values in [0, 2^k) into ceil(n k / 8) bytes (uint8): k bits per element, nothing more."""
    flat = low.reshape(-1)
    if k == 8:
        return flat.to(torch.uint8)
    if k == 16:
        return flat.to(torch.int16).view(torch.uint8)  # low 16 bits, two's complement wrap is fine
    if 8 % k == 0:  # k = 1, 2, 4: whole values per byte, on uint8 (the same layout as below, ~10x faster)
        per = 8 // k
        flat = flat.to(torch.uint8)
        if flat.numel() % per:
            flat = torch.cat([flat, flat.new_zeros(per - flat.numel() % per)])
        cols = flat.view(-1, per)
        out = cols[:, 0].clone()
        for i in range(1, per):
            out |= cols[:, i] << (k * i)
        return out
    shifts = torch.arange(k, device=low.device)
    bits = ((flat.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(-1)  # (n k,) little-endian bits
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=low.device)
    return (bits.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``pack_bits``: int64 tensor of ``shape`` with values in [0, 2^k)."""
    n = math.prod(shape)
    if k == 8:
        return packed.to(torch.int64).view(shape)
    if k == 16:
        return (packed.view(torch.int16).to(torch.int64) & 0xFFFF).view(shape)
    if 8 % k == 0:
        mask = (1 << k) - 1
        vals = torch.stack([(packed >> (k * i)) & mask for i in range(8 // k)], -1).reshape(-1)[:n]
        return vals.to(torch.int64).view(shape)
    shifts = torch.arange(8, device=packed.device)
    bits = ((packed.unsqueeze(-1).to(torch.int64) >> shifts) & 1).reshape(-1)[: n * k].view(n, k)
    weights = 1 << torch.arange(k, device=packed.device, dtype=torch.int64)
    return (bits * weights).sum(-1).view(shape)
