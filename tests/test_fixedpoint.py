"""Fixed-point arithmetic of exact mode against exact rational arithmetic (``fractions``), and the int64
headroom check of the held streams (negative streams included). Both are self-consistent inside the
engine (forward and backward round alike), so only a direct check sees a wrong rounding."""

import math
from fractions import Fraction

import pytest
import torch
from conftest import tiny_config

from revllm.dynamics import fixedpoint as fxp
from revllm.dynamics.leapfrog import Leapfrog
from revllm.engine.streams import FixedStreams

Q = torch.tensor([-(2**40) - 3, -7, -6, -5, -2, -1, 0, 1, 2, 3, 5, 6, 7, 2**40 + 5], dtype=torch.int64)


@pytest.mark.parametrize("coef", [1.0, 2.0, -1.0, 0.25, 0.75, -1.25, 1 / 16, 0.3])
def test_fixed_mul_is_round_half_up_of_the_exact_product(coef):
    got = fxp.fixed_mul(coef, Q)
    for q, g in zip(Q.tolist(), got.tolist()):
        exact = Fraction(coef) * q
        if fxp.dyadic(coef) is not None:  # integers and m / 2^k: round half up, exactly
            assert g == math.floor(exact + Fraction(1, 2)), (coef, q, g)
        else:  # other coefficients: float64 product rounded (deterministic, within one unit)
            assert abs(g - exact) <= 1, (coef, q, g)


def test_stream_headroom_counts_negative_streams_and_the_growth_factor():
    dyn = Leapfrog(tiny_config(dynamics="leapfrog", layers=1))  # A=-1, B=2: growth 4
    s = FixedStreams(dyn, bits=56)
    X = s.encode(torch.zeros(4, dtype=torch.float64))
    Y = s.encode(torch.full((4,), -1.0, dtype=torch.float64))
    Z, _ = s.step(
        0, X, Y, torch.full((4,), -30.0, dtype=torch.float64)
    )  # z = 2y + f = -32: 2^61 fits, x growth 4 does not
    assert Z.max() < 0
    with pytest.raises(ValueError, match=r"exact_reversal: a stream reaches .* int64 headroom"):
        s.check()
    s = FixedStreams(dyn, bits=56)
    s.step(0, X, Y, torch.full((4,), 0.5, dtype=torch.float64))  # z = -1.5: fits
    s.check()
