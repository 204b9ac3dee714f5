"""The dynamics protocol: a rule defines its coefficients, and nothing the engine derives from them."""

import pytest
import torch
from conftest import tiny_model

from revllm.dynamics import Dynamics
from revllm.dynamics.leapfrog import Leapfrog


@pytest.mark.parametrize("method", ["step", "inverse", "step_exact", "inverse_exact"])
def test_a_rule_overriding_a_derived_method_is_refused(method):
    def own(self, *args, **kwargs):  # any body: the engine's backward would ignore it
        raise AssertionError("never called")

    with pytest.raises(TypeError, match=rf"overrides {method}: a rule defines only coefficients"):
        type("MyRule", (Dynamics,), {"name": "my_rule", "coefficients": lambda self, j: (1.0, 0.0, 1.0), method: own})
    with pytest.raises(TypeError, match=rf"overrides {method}"):  # also below a concrete rule
        type("MyLeapfrog", (Leapfrog,), {method: own})


def test_a_rule_with_only_coefficients_gets_the_stored_gradients():
    """A new rule (A=-1/2, B=3/2, C=h: reversible, never registered) needs only ``coefficients``:
    the derived step/inverse and the backward agree, so memory-free gradients equal stored ones."""

    class HalfRule(Dynamics):
        name = "half_rule"

        def coefficients(self, j):
            return -0.5, 1.5, self.h

    grads = {}
    for memory_free in (True, False):
        model = tiny_model(dynamics="leapfrog", layers=3, dtype=torch.float64, memory_free=memory_free)
        model.dynamics = HalfRule(model.config)
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        grads[memory_free] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    x, y, fy = (torch.randn(4, dtype=torch.float64) for _ in range(3))
    rule = model.dynamics
    torch.testing.assert_close(rule.inverse(0, y, rule.step(0, x, y, fy), fy), x, rtol=0, atol=1e-14)
