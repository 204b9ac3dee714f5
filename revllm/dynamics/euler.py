"""Forward Euler (eq. 2.2): p_{j+1} = p_j + f_j(p_j) -- the standard residual network.

Not reversible (A = 0): recovering p_j would need f_j(p_j). It is the baseline and the target of
conversion; it always trains with stored activations.
"""

from .base import Dynamics, register


@register
class Euler(Dynamics):
    name = "euler"
    reversible = False

    def coefficients(self, j):
        return 0.0, 1.0, self.h
