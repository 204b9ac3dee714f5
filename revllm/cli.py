"""The ``revllm`` console script.

Each subcommand lives in ``revllm/commands/<name>.py`` and registers itself with ``add_parser``; the
parser sets ``func``, which receives the parsed namespace and returns an exit code (or None for 0).
User errors (``RevLLMError``, ``ValueError``, ``OSError``: missing files, permissions, a full disk) become one line
on stderr and exit code 2; so do usage errors (the error and a ``--help`` hint; no prefix matching of flags).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from . import __version__, commands
from .commands.common import offline
from .commands.lm_eval import run_cli
from .errors import RevLLMError
from .memory import OPT_OUT_ENV, configure_allocator

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """No prefix matching (``--max-step`` must not pass for ``--max-steps``), and a usage error is the error
    line plus a hint, not a screenful of usage."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message):
        print(f"{self.prog}: error: {message}\nhint: `{self.prog} --help` lists the arguments", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="revllm", description="Reversible LLMs: memory-free training and fine-tuning (arXiv 2512.02056)."
    )
    parser.add_argument("--version", action="version", version=f"revllm {__version__}")
    parser.add_argument(
        "--no-allocator-tuning",
        action="store_true",
        help="leave glibc malloc as it is (same as REVLLM_ALLOCATOR_TUNING=0; see revllm/memory.py)",
    )
    # every subcommand's parser is a Parser too (allow_abbrev=False, short errors)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name == "common":
            continue
        importlib.import_module(f"{commands.__name__}.{mod.name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval's own flags, unchanged: they never meet revllm's parser
        try:
            return run_cli(argv[1:])
        except RevLLMError as e:
            print(f"revllm lm-eval: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's error (and its --help hint), not the top-level one
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.no_allocator_tuning:
        os.environ[OPT_OUT_ENV] = "0"  # also for the processes a command starts (demo, bench rows)
    # The program, not the library, decides that nothing reaches a model hub: library functions use
    # local_files_only=True and never write the environment; this process (and what it starts) runs offline.
    offline()
    configure_allocator()  # before models load: see revllm/memory.py
    try:
        code = int(args.func(args) or 0)
        _close_distributed()
        return code
    except KeyboardInterrupt:
        print(f"revllm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (RevLLMError, ValueError, OSError) as e:  # OSError: missing files, permissions, a full disk
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"revllm {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


def _close_distributed() -> None:
    """Under torchrun / accelerate launch: all ranks meet, then the process group is destroyed before the
    interpreter exits. Left to interpreter teardown, ~ProcessGroupGloo can join a gloo worker thread that
    waits for the GIL the tearing-down thread holds, and the process hangs at exit."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
