"""CLI subcommands: one module per command, each exposing ``add_parser(subparsers)``.

``revllm.cli`` discovers every module here, so adding a command is adding one file. Keep imports of
torch/transformers inside the command's function, so ``revllm --help`` stays fast.
"""
