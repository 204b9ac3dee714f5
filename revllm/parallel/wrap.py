"""DDP and FSDP2 around a RevLLM model, and why the memory-free backward needs (almost) nothing special.

How the reversible engine meets each engine (see revllm/engine/function.py):

* **DDP.** The engine's backward re-evaluates each block and calls ``torch.autograd.backward`` on it,
  which accumulates straight into ``.grad`` through the parameters' ``AccumulateGrad`` nodes, the very
  nodes DDP's reducer hooks. So every block parameter is marked ready exactly once per backward (the
  Hamiltonian's two half-steps use disjoint parameters: attention+ln_1 vs MLP+ln_2), buckets are
  all-reduced as they fill, and no ``find_unused_parameters`` is needed. One exception:
  ``initial_state="fixed_point"`` evaluates layer 0 once more under ordinary autograd, so its
  parameters fire twice; there ``static_graph=True`` (DDP's own answer to reentrant checkpointing) is
  switched on.
* **FSDP2** (``fully_shard`` per transformer layer, then the root). The engine's forward runs under
  no-grad: each layer's pre-forward hook all-gathers, its post-forward hook reshards, and no backward
  hooks are registered. In the backward the engine calls the layer module again with grad enabled, so
  FSDP2's hooks run once more: all-gather, register the post-backward (reduce-scatter) on the input and
  the pre-backward on the output; ``torch.autograd.backward`` then reduce-scatters that layer's
  gradients and reshards it before the next layer is rebuilt. Peak memory therefore holds one
  unsharded layer, as FSDP2 intends.
  The one thing FSDP2 does not expect is a *second* call of the same layer inside one backward (the
  Hamiltonian's attention and MLP half-steps): it treats it as activation-checkpoint recomputation,
  skips the post-backward registration, and the second half's gradients would never be
  reduce-scattered. ``_fresh_recompute_hook`` (a forward pre-hook added from outside) resets the
  layer's state so each call inside the backward is a fresh forward with its own reduce-scatter; the
  sharded gradients then accumulate, each parameter reduced exactly once.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

from ..errors import RevLLMError

MODES = ("none", "ddp", "fsdp2")


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun/accelerate describe in the environment.

    Returns (rank, world size, this rank's device). Without ``WORLD_SIZE`` in the environment it is a
    single process: (0, 1, cpu-or-cuda). The backend defaults to nccl with CUDA, gloo otherwise.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return dist.get_rank(), dist.get_world_size(), device


def unwrap(model: nn.Module) -> nn.Module:
    """The RevLLM model inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def base_model(model: nn.Module) -> nn.Module:
    """The model inside any nesting of DDP and peft wrappers (DDP(PeftModel(model)) under torchrun)."""
    while True:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "module", model)
        if inner is model:
            return model
        model = inner


def parallelize(
    model: nn.Module,
    mode: str = "ddp",
    *,
    mp_policy=None,
    reshard_after_forward: bool = True,
    device: torch.device | None = None,
    mesh=None,
) -> nn.Module:
    """Apply data parallelism to a ``RevLLMForCausalLM``; call after ``init_distributed``.

    Args:
        mode: ``"ddp"`` (replicated weights, all-reduced gradients), ``"fsdp2"`` (``fully_shard`` per
            transformer layer, then the root: sharded weights, gradients and optimizer state) or
            ``"none"``.
        mp_policy: FSDP2 only: a ``MixedPrecisionPolicy`` or ``"bf16"`` (bf16 parameters for compute,
            fp32 gradient reduction). The reversible streams stay in their own dtype whatever it is.
        reshard_after_forward: FSDP2 only: free each layer's gathered weights after its forward.
        device: the device the model should live on (default: the model's).
        mesh: FSDP2 only: a 1-D DeviceMesh (default: all ranks).

    Returns the module to call for training: the DDP wrapper, or the model sharded in place.
    """
    if mode not in MODES:
        raise RevLLMError(f"parallel mode {mode!r} is unknown; allowed: {', '.join(MODES)}")
    if mode != "fsdp2" and mp_policy is not None:
        raise RevLLMError(f"mp_policy is an FSDP2 option; it would be ignored with parallel mode {mode!r}")
    if mode == "none":
        return model
    if not dist.is_initialized():
        raise RevLLMError(f"parallel mode {mode!r} needs a process group: launch with torchrun or accelerate")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=ddp_static_graph(model)
        )
    return _fully_shard(model, _mp_policy(mp_policy), reshard_after_forward, mesh)


def ddp_static_graph(model) -> bool:
    """DDP needs ``static_graph=True`` for the fixed-point start: layer 0 is evaluated twice per step
    (see the module docstring)."""
    return getattr(model.config, "initial_state", "copy") == "fixed_point"


def _mp_policy(mp_policy):
    if mp_policy is None or isinstance(mp_policy, MixedPrecisionPolicy):
        return mp_policy or MixedPrecisionPolicy()
    if mp_policy == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise RevLLMError(f"mp_policy={mp_policy!r} is unknown; pass 'bf16' or a MixedPrecisionPolicy")


def _fully_shard(model, mp_policy, reshard_after_forward, mesh):
    if type(model).__name__.startswith("Peft"):
        raise RevLLMError("parallel mode fsdp2 does not support LoRA (peft) models; use ddp")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise RevLLMError("fsdp2 expects a RevLLMForCausalLM (model.model.layers); got " + type(model).__name__)
    kw = dict(mp_policy=mp_policy, mesh=mesh)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    # The root holds embeddings, tied LM head, final norm and the dynamics' buffers; it is not
    # resharded after forward (its weights are needed again at the start of the backward).
    fully_shard(model, **kw)
    install_fsdp2_recompute_hooks(model)
    return model


def install_fsdp2_recompute_hooks(model: nn.Module) -> int:
    """Add ``_fresh_recompute_hook`` to every FSDP2-sharded layer of ``model``; returns how many.

    ``parallelize(..., "fsdp2")`` does this itself. Call it after any other code applied
    ``fully_shard`` to the layers (e.g. ``accelerate``'s FSDP2 plugin in ``Accelerator.prepare``);
    without it the Hamiltonian's attention-half gradients are never reduce-scattered (they stay None).
    Idempotent.
    """
    n = 0
    for layer in unwrap(model).model.layers:
        if not hasattr(layer, "_get_fsdp_state"):
            continue
        if not getattr(layer, "_revllm_recompute_hook", False):
            # prepend: must run before FSDP2's own pre-forward hook, which reads the state it resets.
            layer.register_forward_pre_hook(_fresh_recompute_hook, prepend=True, with_kwargs=True)
            layer._revllm_recompute_hook = True
        n += 1
    return n


def _fresh_recompute_hook(module, args, kwargs):
    """Make every call of a layer inside the backward a fresh FSDP2 forward (see module docstring)."""
    state = module._get_fsdp_state()
    # Inside a backward (a graph task is running) and already past this layer's pre-backward: the
    # engine is rebuilding the next part of the same layer. IDLE lets FSDP2's pre-forward all-gather
    # and register the post-backward reduce-scatter again.
    if torch._C._current_graph_task_id() != -1 and state._training_state == TrainingState.PRE_BACKWARD:
        state._training_state = TrainingState.IDLE
    return args, kwargs


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Gradient accumulation: ``with gradient_sync(model, False):`` skips the all-reduce (DDP's
    ``no_sync``) or reduce-scatter (FSDP2's ``set_requires_gradient_sync(False)``) for the backward(s)
    inside; the first backward outside reduces everything accumulated so far."""
    if enabled:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP (and FSDP1 when accelerate wraps with it)
        with model.no_sync():
            yield
    else:
        yield
