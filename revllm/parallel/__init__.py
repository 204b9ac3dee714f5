"""Data parallelism on PyTorch's own engines: DDP and FSDP2, plus sharded (DCP) checkpoints.

Applied from outside the model, in one function (``parallelize``), as torchtitan's ``parallelize.py``
and lingua's ``parallelize_model`` do; the model, blocks and engine import nothing distributed.
"""

from .checkpoint import load_sharded, save_sharded
from .wrap import (
    MODES,
    ddp_static_graph,
    gradient_sync,
    init_distributed,
    install_fsdp2_recompute_hooks,
    parallelize,
    unwrap,
)

__all__ = [
    "MODES",
    "ddp_static_graph",
    "gradient_sync",
    "init_distributed",
    "install_fsdp2_recompute_hooks",
    "load_sharded",
    "parallelize",
    "save_sharded",
    "unwrap",
]
