"""Leapfrog (eq. 2.6): p_{j+1} = 2 p_j - p_{j-1} + h^2 f_j(p_j)      A=-1, B=2, C=h^2.

Stable for real negative Jacobian eigenvalues, -4 <= h^2 lambda <= 0 (paper section 3).
"""

from .base import Dynamics, register


@register
class Leapfrog(Dynamics):
    name = "leapfrog"

    def coefficients(self, j):
        return -1.0, 2.0, self.h * self.h
