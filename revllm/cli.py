"""The ``revllm`` console script.

Each subcommand lives in ``revllm/commands/<name>.py`` and registers itself with ``add_parser``; the
parser sets ``func``, which receives the parsed namespace and returns an exit code (or None for 0).
User errors (``RevLLMError``, ``ValueError``, missing files) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .errors import RevLLMError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revllm", description="Reversible LLMs: memory-free training and fine-tuning (arXiv 2512.02056)."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"revllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name == "common":
            continue
        importlib.import_module(f"{commands.__name__}.{mod.name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
