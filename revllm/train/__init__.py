"""Training: the loop (loop.py), its config (config.py), checkpoints (checkpoint.py), optimizer (optim.py)."""

from .config import TrainConfig, build_config
from .loop import causal_lm_loss, train

__all__ = ["TrainConfig", "build_config", "causal_lm_loss", "train"]
