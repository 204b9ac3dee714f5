"""Memory-free backpropagation through a reversible stack."""
from .function import ReversibleStackFunction, Stack, run_stack

__all__ = ["ReversibleStackFunction", "Stack", "run_stack"]
