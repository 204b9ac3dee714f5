"""Per-layer RNG capture and replay, so dropout masks in the backward's recomputation equal the forward's.

The forward records the generator states before each block evaluation; the backward restores them
inside ``torch.random.fork_rng`` so the caller's global RNG stream is left untouched.
"""

from __future__ import annotations

import contextlib

import torch


def capture(device: torch.device):
    cpu = torch.get_rng_state()
    dev = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, dev


@contextlib.contextmanager
def replay(state, device: torch.device):
    """Run the body with the captured generator states, then put the caller's states back."""
    cpu, dev = state
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.set_rng_state(cpu)
        if dev is not None:
            torch.cuda.set_rng_state(dev, device)
        yield
