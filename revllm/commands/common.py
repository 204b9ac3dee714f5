"""Helpers shared by the subcommands (not a command itself: cli.py skips this module)."""
from __future__ import annotations

import argparse
import os


def offline():
    """Nothing at run time may reach a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (importing revllm already did): set its constant too.
    import huggingface_hub.constants as hub

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


def explicit_keys(args, names) -> dict:
    """The flags the user actually gave (their argparse default is None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
