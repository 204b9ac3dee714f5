"""CLI subcommands: one module per command, each exposing ``add_parser(subparsers)``.

``revllm.cli`` discovers every module here, so adding a command is adding one file (``common.py`` holds
what several commands share). Imports sit at the top of each module, as everywhere in revllm: importing
the package loads torch and transformers anyway; only optional dependencies (lm-eval) are imported where
they are used.
"""
