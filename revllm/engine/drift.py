"""Reconstruction-drift monitor: how far the backward's reconstructed states are from the forward's.

Two checks, written by the engine during each memory-free backward:
  * always on, cheap: the reconstructed bottom pair against the stack's actual inputs (the embedding
    output), one relative error per backward, kept as a 0-d tensor so the backward never waits on it;
  * debug (``per_layer=True``): the forward keeps a copy of every state (O(depth) memory, so it is a
    diagnostic, not a training mode) and the backward reports each reconstructed state's relative
    error. Above ``threshold`` it warns, and with ``fallback=True`` the backward continues from the
    stored states for the rest of that step, so the step's gradient is the stored-activation one.
In exact mode (fixed-point streams) both are exactly 0.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

logger = logging.getLogger("revllm.drift")


@dataclass
class DriftMonitor:
    per_layer: bool = False
    threshold: float | None = None
    fallback: bool = False
    last_bottom_t: torch.Tensor | None = None  # relative error of the reconstructed input pair
    last_per_layer: list[float] | None = None  # per substep, forward order (debug mode)
    fallbacks: int = 0  # backward passes that switched to the stored states

    @classmethod
    def attach(cls, owner, config) -> DriftMonitor:
        """The monitor kept on ``owner`` (the model) as ``drift_monitor``, synced with ``config``."""
        mon = owner.__dict__.get("drift_monitor")
        if mon is None:
            mon = cls()
            owner.__dict__["drift_monitor"] = mon  # plain attribute, not a submodule or state
        mon.per_layer = bool(getattr(config, "drift_monitor", False))
        mon.threshold = getattr(config, "drift_threshold", None)
        mon.fallback = bool(getattr(config, "drift_fallback", False))
        return mon

    @property
    def last_bottom(self) -> float | None:
        """The latest bottom-state relative error as a float (syncs the device once)."""
        return None if self.last_bottom_t is None else float(self.last_bottom_t)

    def exceeded(self, rel: torch.Tensor) -> bool:
        return self.threshold is not None and float(rel) > self.threshold

    def record_bottom(self, rel: torch.Tensor) -> None:
        self.last_bottom_t = rel.detach()
        if self.threshold is not None or logger.isEnabledFor(logging.DEBUG):
            v = float(rel)
            logger.debug("reconstruction drift at the bottom state: %.3g", v)
            if self.threshold is not None and v > self.threshold:
                warnings.warn(f"reversible backward: bottom-state drift {v:.3g} > drift_threshold {self.threshold:g}")

    def record_layers(self, rels: list[torch.Tensor]) -> None:
        """``rels`` in backward order; stored in forward order."""
        self.last_per_layer = [float(r) for r in reversed(rels)]
        logger.debug("per-layer reconstruction drift: max %.3g", max(self.last_per_layer, default=0.0))


def relative_error(rec: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||rec - ref|| / ||ref|| in float64 (fixed-point ints compare exactly before the cast)."""
    diff = (rec - ref).to(torch.float64)
    return diff.norm() / ref.to(torch.float64).norm().clamp_min(1e-300)
