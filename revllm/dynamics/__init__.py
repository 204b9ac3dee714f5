"""Residual-update rules: one class per rule, registered by name in ``DYNAMICS``."""

from . import euler, hamiltonian, leapfrog, midpoint  # noqa: F401  (registration)
from .base import DYNAMICS, Dynamics, register


def build_dynamics(config) -> Dynamics:
    return DYNAMICS[config.dynamics](config)


__all__ = ["DYNAMICS", "Dynamics", "register", "build_dynamics"]
