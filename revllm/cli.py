"""The ``revllm`` console script.

Each subcommand lives in ``revllm/commands/<name>.py`` and registers itself with ``add_parser``; the
parser sets ``func``, which receives the parsed namespace and returns an exit code (or None for 0).
User errors (``RevLLMError``, ``ValueError``, missing files) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from . import commands
from .errors import RevLLMError
from .memory import OPT_OUT_ENV, configure_allocator

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revllm", description="Reversible LLMs: memory-free training and fine-tuning (arXiv 2512.02056)."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"revllm {__version__}")
    parser.add_argument("--no-allocator-tuning", action="store_true",
                        help="leave glibc malloc as it is (same as REVLLM_ALLOCATOR_TUNING=0; see revllm/memory.py)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name == "common":
            continue
        importlib.import_module(f"{commands.__name__}.{mod.name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_allocator_tuning:
        os.environ[OPT_OUT_ENV] = "0"  # also for the processes a command starts (demo, bench rows)
    configure_allocator()  # before models load: see revllm/memory.py
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"revllm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (RevLLMError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"revllm {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
