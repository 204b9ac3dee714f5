"""Hamiltonian / symplectic-Euler rule (eqs. 2.8-2.9), two streams (q, p):

    q_j = q_{j-1} + h Attn_j(LN1(p_{j-1}))
    p_j = p_{j-1} + h MLP_j(LN2(q_j))

Each is a half-step of the generic two-step form with A=1, B=0, C=h: the pair (q_{j-1}, p_{j-1})
becomes (p_{j-1}, q_j) with the block's attention part, then (q_j, p_j) with its MLP part. With the
default h = 1 this is exactly the paper's rule. The initial pair is (q_0, p_0); the newest stream p_L
feeds the final norm.
"""

from .base import Dynamics, register


@register
class Hamiltonian(Dynamics):
    name = "hamiltonian"
    parts = ("attn", "mlp")

    def coefficients(self, j):
        return 1.0, 0.0, self.h
