"""Full (unsharded) model and optimizer state of an FSDP2 model, in the single-process formats.

``revllm train`` keeps one checkpoint format whatever the launch: an HF model dir plus optimizer
tensors keyed by parameter index, as ``torch.optim.Optimizer.state_dict()`` gives in one process. Under
FSDP2 these are gathered with ``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True``,
collective, offloaded to CPU) and converted between its FQN keys and the index keys; loading shards them
again. The sharded (DCP) format is ``revllm.parallel.save_sharded`` for runs too big to gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _fqns_in_optimizer_order(model: nn.Module, optimizer) -> list[str]:
    name = {p: n for n, p in model.named_parameters()}
    return [name[p] for g in optimizer.param_groups for p in g["params"]]


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def full_model_copy(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded, CPU) copy of an FSDP2-sharded RevLLM model for ``save_pretrained``.

    Collective: every rank must call it; rank 0 gets the copy (``cpu_offload`` gathers there), others None.
    """
    sd = get_model_state_dict(model, options=_FULL)
    if not _rank0():
        return None
    plain_cls = next(c for c in type(model).__mro__[1:] if not c.__name__.startswith("FSDP"))
    with torch.device("meta"):
        plain = plain_cls(model.config)
    plain.load_state_dict(sd, strict=False, assign=True)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    buffers = {n: b for n, b in model.named_buffers()}
    for n, b in list(plain.named_buffers()):
        if b.is_meta:  # non-persistent buffers (rotary inv_freq) are not in the state dict
            mod_name, _, attr = n.rpartition(".")
            plain.get_submodule(mod_name).register_buffer(attr, buffers[n].detach().cpu().clone(), persistent=False)
    assert not missing, f"parameters missing from the gathered state dict: {missing}"
    return plain


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer state as a single process's ``optimizer.state_dict()`` (index keys).

    Collective; rank 0 gets the state, others None.
    """
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not _rank0():
        return None
    index = {fqn: i for i, fqn in enumerate(_fqns_in_optimizer_order(model, optimizer))}
    groups = [dict(g, params=[index[f] for f in g["params"]]) for g in osd["param_groups"]]
    return {"state": {index[f]: st for f, st in osd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Inverse of ``full_optimizer_state``: every rank passes the full state; it is sharded in place."""
    fqns = _fqns_in_optimizer_order(model, optimizer)
    osd = {
        "state": {fqns[int(i)]: st for i, st in state["state"].items()},
        "param_groups": [dict(g, params=[fqns[int(i)] for i in g["params"]]) for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
