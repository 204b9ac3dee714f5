"""``revllm lm-eval ARGS...``: lm-eval's own command line, with revllm's model classes registered.

``lm_eval --model hf --model_args pretrained=RUN/model`` cannot load a revllm model on its own: lm-eval
never imports revllm, so transformers does not know the ``revllm`` model type, and revllm ships no
``auto_map``/remote code for ``trust_remote_code`` to run. This command imports revllm (which registers
``RevLLMConfig`` / ``RevLLMForCausalLM`` with the Auto classes) and hands ARGS, unchanged, to lm-eval's own
CLI entry point (``lm_eval.__main__.cli_evaluate``), offline. ``trust_remote_code`` stays off: asking for
it is refused in one line. Example::

    revllm lm-eval --model hf --model_args pretrained=runs/rev/checkpoints/step_00000200/model \\
        --tasks revllm_commonsense --include_path DIR --device cpu --limit 20
"""

from __future__ import annotations

import sys

from ..errors import RevLLMError
from .common import offline


def add_parser(sub):
    # Only for `revllm --help`'s command list: revllm.cli passes everything after `lm-eval` straight to
    # run_cli, so lm-eval's own flags (and its --help) never meet revllm's parser.
    sub.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-eval's own command line with revllm models registered (`revllm lm-eval --help` shows lm-eval's flags)",
    )


def _refuse_remote_code(args: list[str]) -> None:
    for i, a in enumerate(args):
        value = args[i + 1] if a == "--model_args" and i + 1 < len(args) else a
        if a == "--trust_remote_code" or (
            a.startswith("--model_args")
            and "trust_remote_code" in value.lower()
            and "trust_remote_code=false" not in value.lower()
        ):
            raise RevLLMError(
                "trust_remote_code is refused: revllm's classes are registered by this command "
                "(no remote code runs); drop it"
            )


def run_cli(args: list[str]) -> int:
    """Run lm-eval's CLI on ``args`` in this process, revllm registered. Returns its exit status."""
    _refuse_remote_code(args)
    offline()
    # lm-eval is optional (the eval extra); revllm's model type is registered already (importing any revllm
    # module runs revllm/__init__.py).
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse errors and --help exit through here
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return 0
