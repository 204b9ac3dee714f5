"""``revllm train``: train a RevLLMForCausalLM from scratch, from a model dir, or resume a run."""

from __future__ import annotations

import argparse
import dataclasses

from ..blocks import FAMILIES
from ..train import build_config, train
from ..train.config import TrainConfig, load_yaml

# flag -> (type, help); every flag defaults to None so that only explicit flags override the YAML.
FLAGS = {
    "block": (str, f"residual-branch family: {' | '.join(sorted(FAMILIES))}"),
    "dynamics": (str, "euler | midpoint | leapfrog | midpoint_a | hamiltonian"),
    "step_size": (float, "h (default: the rule's own)"),
    "initial_state": (str, "copy | zero | fixed_point"),
    "layers": (int, "number of layers"),
    "hidden": (int, "hidden size"),
    "heads": (int, "attention heads"),
    "kv_heads": (int, "key/value heads (grouped-query attention, where the family allows it)"),
    "intermediate": (int, "MLP width (default 4x hidden)"),
    "max_positions": (int, "max position embeddings (default seq_len)"),
    "dropout": (float, "dropout probability"),
    "loss_chunk_size": (int, "tokens per LM-head loss chunk"),
    "init_from": (str, "start from this model/checkpoint/run dir instead of random weights"),
    "seq_len": (int, "tokens per sequence"),
    "batch_size": (int, "sequences per micro-batch"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "min_lr": (float, "final learning rate of the cosine"),
    "warmup": (int, "linear warmup steps"),
    "max_steps": (int, "optimizer steps"),
    "schedule_steps": (int, "steps the warmup + cosine lr schedule plans (default --max-steps; kept on --resume)"),
    "weight_decay": (float, "AdamW decoupled weight decay"),
    "beta1": (float, "AdamW beta1"),
    "beta2": (float, "AdamW beta2"),
    "clip": (float, "gradient-norm clip (0 = off)"),
    "precision": (str, "auto | fp32 | bf16 | fp16 (auto: bf16 on a bf16 GPU, fp32 on CPU)"),
    "parallel": (str, "ddp | fsdp2 when launched with torchrun/accelerate on several processes"),
    "seed": (int, "seed for init, batches and dropout"),
    "eval_interval": (int, "steps between validations"),
    "eval_iters": (int, "validation batches"),
    "checkpoint_interval": (int, "steps between checkpoints"),
    "keep_last": (int, "checkpoints kept (0 = all)"),
    "log_interval": (int, "steps between CSV/TensorBoard rows"),
    "max_time": (float, "stop (with a checkpoint) after this many seconds"),
    "stop_after": (int, "stop (with a checkpoint) after this step; the lr schedule still plans --max-steps"),
}
BOOLS = {
    "memory_free": "reversible backward (default on for reversible dynamics)",
    "activation_checkpointing": "per-layer activation checkpointing of the stored path (baseline)",
    "exact_reversal": "int64 fixed-point streams: the memory-free backward reconstructs every layer bit-exactly",
    "progress": "progress bar",
}


def add_parser(sub):
    p = sub.add_parser(
        "train",
        help="train a reversible LM (or its standard-residual baseline)",
        description="Train from scratch, from --init-from, or --resume RUN. Flags override --config YAML "
        "(keys = flag names).",
        argument_default=None,
    )
    p.add_argument("--data", help="token directory from `revllm data`")
    p.add_argument("--out", help="run directory")
    p.add_argument("--config", help="YAML file of flag values")
    p.add_argument(
        "--resume", action="store_true", default=None, help="continue from the latest good checkpoint in --out"
    )
    defaults = TrainConfig()
    for name, (typ, hlp) in FLAGS.items():
        d = getattr(defaults, name)
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=typ, help=hlp if d is None else f"{hlp} (default {d})"
        )
    for name, hlp in BOOLS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction, help=hlp)
    p.set_defaults(func=run)


def run(args):
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    cfg = build_config(args.config, given)
    explicit = set(given)
    if args.config:
        explicit |= set(load_yaml(args.config))
    s = train(cfg, explicit=explicit)
    if s["rank"] != 0:  # under torchrun / accelerate launch the summary line is rank 0's alone
        return 0
    print(
        f"{s['run']}: {s['steps']} steps, val loss {s['val_loss']:.4f} (ppl {s['val_ppl']:.1f}), "
        f"{s['tokens_per_s']:,.0f} tok/s, activations {s['activation_mb']:.1f} MB, peak {s['peak_mb']:.0f} MB"
        + (f"; stopped early: {s['stopped_early']}" if s["stopped_early"] else "")
    )
