"""Benchmark configurations, model construction, one training step, the machine (instruments: revllm.memory).

Configuration names (see the package docstring for (a)-(d)):
  ``euler``            (a) standard residual, stored activations
  ``euler_ckpt``       (b) (a) + per-layer activation checkpointing, non-reentrant (HF's default)
  ``<rev>``            (c) reversible dynamics ``<rev>`` with memory-free backprop
  ``<rev>_stored``     (d) the same reversible model, ordinary stored autograd
Shape legend: B batch, T tokens (sequence length), D width, L layers, V vocab.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass

import torch

from ..dynamics import DYNAMICS
from ..errors import RevLLMError
from ..modeling import RevLLMConfig, RevLLMForCausalLM


def reversible_names() -> list[str]:
    return sorted(k for k, v in DYNAMICS.items() if v.reversible)


def known_configs() -> list[str]:
    rev = reversible_names()
    return ["euler", "euler_ckpt"] + rev + [f"{r}_stored" for r in rev]


def parse_config(name: str) -> tuple[str, bool, bool]:
    """``name`` -> (dynamics, memory_free, checkpointing); a one-line error for unknown names."""
    rev = reversible_names()
    if name == "euler":
        return "euler", False, False
    if name == "euler_ckpt":
        return "euler", False, True
    if name in rev:
        return name, True, False
    if name.endswith("_stored") and name[: -len("_stored")] in rev:
        return name[: -len("_stored")], False, False
    raise RevLLMError(f"unknown configuration {name!r}; known: {', '.join(known_configs())}")


def config_kind(name: str) -> str:
    """The issue's letter for a configuration: a, b, c or d."""
    dyn, mf, ckpt = parse_config(name)
    if dyn == "euler":
        return "b" if ckpt else "a"
    return "c" if mf else "d"


def parse_configs(text: str | list[str]) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise RevLLMError("no configuration given")
    for n in names:
        parse_config(n)
    if len(set(names)) != len(names):
        raise RevLLMError(f"configuration listed twice in {','.join(names)}")
    return names


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tib": 1024**4,
}


def parse_bytes(text: str | int | None) -> int | None:
    """'4GiB', '512MiB', '3.5G' or a plain byte count -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise RevLLMError(f"cannot read memory size {text!r}; write e.g. 4GiB, 512MiB or a byte count")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise RevLLMError(f"memory size {text!r} must be positive")
    return n


def parse_ints(text: str | list[int], what: str) -> list[int]:
    try:
        vals = [int(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise RevLLMError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise RevLLMError(f"{what} must be positive integers, got {text!r}")
    if len(set(vals)) != len(vals):
        raise RevLLMError(f"{what} lists a value twice: {text!r}")
    return sorted(vals)


@dataclass
class Spec:
    """One measurement's model and data shape; serialised to the worker as JSON."""

    config: str = "euler"
    layers: int = 6
    d: int = 512
    heads: int = 8
    seq: int = 256
    batch: int = 8
    vocab: int = 8192
    block: str = "gpt2"
    loss_chunk: int = 1024
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 or bf16 (autocast; the streams and weights stay fp32)
    compile: bool = False
    seed: int = 0

    def to_dict(self):
        return asdict(self)


def resolve_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    """Defaults: cuda + bf16 when a GPU is present, else cpu + fp32."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise RevLLMError(f"device {device!r} is not supported; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RevLLMError("device cuda requested but torch sees no GPU")
    if dtype in (None, "auto"):
        dtype = "bf16" if device == "cuda" else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise RevLLMError(f"dtype {dtype!r} is not supported; use fp32 or bf16")
    return device, dtype


def build_model(spec: Spec):
    """The benchmark model for ``spec``: gradients preallocated, train mode, on the device."""
    dyn, memory_free, ckpt = parse_config(spec.config)
    cfg = RevLLMConfig(
        block=spec.block,
        dynamics=dyn,
        memory_free=memory_free,
        num_hidden_layers=spec.layers,
        hidden_size=spec.d,
        num_attention_heads=spec.heads,
        vocab_size=spec.vocab,
        max_position_embeddings=max(spec.seq, 1024),
        loss_chunk_size=spec.loss_chunk,
    )
    torch.manual_seed(spec.seed)
    model = RevLLMForCausalLM(cfg).to(spec.device).train()
    if ckpt:
        # Exactly what a Hugging Face user turns on: per-layer torch.utils.checkpoint, non-reentrant.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if spec.compile:
        for block in model.model.layers:
            block.compile()  # the block function f only; the engine and the dynamics stay eager
    return model


def make_batch(spec: Spec, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed + 1)
    return torch.randint(0, spec.vocab, (batch or spec.batch, spec.seq), generator=g).to(spec.device)


def autocast(spec: Spec):
    return torch.autocast(spec.device, dtype=torch.bfloat16, enabled=spec.dtype == "bf16")


def preallocate_grads(model):
    """Steady-state training keeps .grad allocated (zero_grad(set_to_none=False)); doing so before the
    measured step keeps gradient allocation out of the activation-peak figures."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def train_step(model, ids, spec: Spec, optimizer=None):
    with autocast(spec):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return float(loss.detach())


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def machine(device: str) -> dict:
    """Where a table was measured: CPU model, cores, torch, device (and card memory on CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    try:
        info["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def machine_tag(device: str) -> str:
    """Short file-name tag: ``cpu`` or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``."""
    if device != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
