"""Memory-free backpropagation through a reversible stack."""

from .drift import DriftMonitor
from .function import ReversibleStackFunction, Stack, run_stack

__all__ = ["DriftMonitor", "ReversibleStackFunction", "Stack", "run_stack"]
