"""Helpers shared by the subcommands (not a command itself: cli.py skips this module)."""

from __future__ import annotations

import argparse
import os

import huggingface_hub.constants as hub
import torch


def offline():
    """Nothing the ``revllm`` program runs may reach a model hub. Called by ``revllm.cli`` for its own
    process (``setdefault``: a user's explicit setting wins); library code never calls it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers imports DeepSpeed (when installed) inside save_pretrained; without an accelerator DeepSpeed
    # then warns "Setting accelerator to CPU" mid-run. Naming the CPU it would pick anyway keeps it quiet.
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (importing revllm already did): set its constant too.
    if os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE"):
        hub.HF_HUB_OFFLINE = True


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{v:g} must be > 0")
    return v


# The conversion's defaults (finetune applies them only when it converts SRC itself).
DYNAMICS_DEFAULTS = dict(dynamics="midpoint_a", k=4, initial_state="fixed_point")


def add_dynamics_args(p: argparse.ArgumentParser) -> None:
    d = DYNAMICS_DEFAULTS
    p.add_argument(
        "--dynamics",
        default=d["dynamics"],
        choices=["euler", "midpoint", "leapfrog", "midpoint_a", "hamiltonian"],
        help="update rule (default midpoint_a: near-Euler with a = 2^-k)",
    )
    p.add_argument("--k", type=int, default=d["k"], help="midpoint_a coefficient a = 2^-k (default 4)")
    p.add_argument("--step-size", type=float, default=None, help="h (default 1.0, the residual's step)")
    p.add_argument(
        "--initial-state",
        default=d["initial_state"],
        choices=["fixed_point", "copy", "zero"],
        help="second initial stream (default fixed_point: p_-1 = p_0 - h f_0(p_0))",
    )
    p.add_argument(
        "--memory-free",
        choices=["auto", "on", "off"],
        default="auto",
        help="reversible backward (auto: on for reversible rules that can reconstruct)",
    )


def dynamics_kwargs(args) -> dict:
    kw = dict(dynamics=args.dynamics, k=args.k, step_size=args.step_size, initial_state=args.initial_state)
    if args.memory_free != "auto":
        kw["memory_free"] = args.memory_free == "on"
    return kw
