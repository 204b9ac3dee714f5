"""``revllm finetune SRC --data DATA --out RUN``: distill (default) or SFT a (converted) model.

SRC is a converted revllm model, or an original HF model / .gguf / ``smollm2`` which is first converted
with ``--dynamics/--k`` (the original then serves as the teacher). For a model that is already converted,
distillation needs ``--teacher``. DATA is a ``revllm data`` token dir. Training runs on ``revllm train``'s loop (checkpoints, --resume, metrics.csv).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..convert import convert
from ..convert.distill import AnnealA, DistillLoss
from ..convert.finetune import finetune
from ..dynamics.fixedpoint import dyadic
from ..errors import RevLLMError
from ..io import load_model, load_tokenizer, resolve_model_dir
from .common import DYNAMICS_DEFAULTS, add_dynamics_args, dynamics_kwargs, positive_int

# Defaults of a new run. They are not argparse defaults: on --resume an unset flag keeps the run's own value.
TRAINING_DEFAULTS = dict(
    steps=100, batch_size=4, seq_len=128, lr=1e-4, warmup=10, seed=0, eval_interval=50, checkpoint_interval=100
)


def add_training_args(p: argparse.ArgumentParser) -> None:
    d = TRAINING_DEFAULTS
    g = p.add_argument_group("fine-tuning (the `revllm train` loop; on --resume, unset flags keep the run's values)")
    g.add_argument("--steps", type=positive_int, help=f"optimizer steps (default {d['steps']})")
    g.add_argument("--batch-size", type=positive_int, help=f"sequences per step (default {d['batch_size']})")
    g.add_argument("--seq-len", type=positive_int, help=f"tokens per sequence (default {d['seq_len']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']:g}; cosine to lr/10)")
    g.add_argument("--warmup", type=int, help=f"warm-up steps (default {d['warmup']})")
    g.add_argument("--seed", type=int, help=f"(default {d['seed']})")
    g.add_argument("--eval-interval", type=positive_int, help=f"(default {d['eval_interval']})")
    g.add_argument("--checkpoint-interval", type=positive_int, help=f"(default {d['checkpoint_interval']})")
    g.add_argument("--max-time", type=float, default=None, help="seconds; stop (and checkpoint) early")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest good checkpoint")
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar (logs and metrics.csv only)"
    )
    g.add_argument(
        "--parallel",
        choices=["ddp", "fsdp2"],
        default="ddp",
        help="under torchrun/accelerate launch with several processes (--batch-size is per process)",
    )
    g.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T (loss scaled by T^2)")
    g.add_argument("--ce-weight", type=float, default=0.0, help="weight of the added cross-entropy on the text")
    g.add_argument("--hidden-weight", type=float, default=0.0, help="weight of final-hidden-state matching (MSE)")
    g.add_argument(
        "--lora", type=int, default=0, metavar="R", help="train LoRA adapters of rank R (peft), merged on save"
    )
    g.add_argument(
        "--anneal-a",
        type=int,
        default=None,
        metavar="K_END",
        help="midpoint_a: step k down to K_END (a = 2^-k toward 1) over the run",
    )


def add_parser(sub):
    p = sub.add_parser(
        "finetune",
        help="distillation or supervised fine-tuning of a converted model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="converted revllm model, or an HF dir / .gguf / 'smollm2' to convert first")
    p.add_argument("--data", required=True, help="token directory from `revllm data` (made with the model's tokenizer)")
    p.add_argument("--out", required=True, help="run directory (model saved to RUN/model)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--distill", dest="distill", action="store_true", default=True, help="KL to the teacher (default)"
    )
    mode.add_argument("--sft", dest="distill", action="store_false", help="plain cross-entropy on DATA")
    p.add_argument("--teacher", help="teacher model (default: SRC itself when SRC is an original HF model)")
    add_dynamics_args(p)
    # None = not given: the conversion flags apply only when SRC is converted here (see run)
    p.set_defaults(**dict.fromkeys(DYNAMICS_DEFAULTS))
    add_training_args(p)
    p.set_defaults(func=run)


def apply_training_defaults(args) -> None:
    """A new run gets TRAINING_DEFAULTS for unset flags; a resumed one keeps its checkpoint's values."""
    if not args.resume:
        for k, v in TRAINING_DEFAULTS.items():
            if getattr(args, k) is None:
                setattr(args, k, v)


def run_finetune(model, teacher, tokenizer, data, out, args, distill: bool, loss_fn=None) -> dict:
    """``loss_fn`` overrides the distillation loss built from the flags (the O(1) recipe passes its own)."""
    if distill and loss_fn is None:
        if teacher is None:
            raise ValueError("distillation needs a teacher: pass --teacher ORIGINAL (or use --sft)")
        loss_fn = DistillLoss(teacher, args.temperature, args.ce_weight, args.hidden_weight)
    anneal = None
    if args.anneal_a is not None:
        if model is None:
            raise ValueError("--resume continues the run's own a-annealing schedule (RUN/anneal.json): drop --anneal-a")
        if model.config.dynamics != "midpoint_a":
            raise ValueError(f"--anneal-a needs a midpoint_a model, not {model.config.dynamics}")
        a = model.config.midpoint_a
        d = dyadic(a) if isinstance(a, (int, float)) and 0 < a <= 1 else None
        if d is None or d[0] != 1:  # a single a = 2^-k, as a conversion sets it
            raise ValueError(
                f"--anneal-a needs one coefficient a = 2^-k (a converted near-Euler model); got midpoint_a={a!r}"
            )
        anneal = AnnealA(d[1], args.anneal_a, args.steps)
    return finetune(
        model,
        data,
        out,
        teacher=teacher if distill else None,
        loss_fn=loss_fn,
        lora=args.lora,
        anneal=anneal,
        tokenizer=tokenizer,
        resume=args.resume,
        max_steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr=None if args.lr is None else args.lr / 10,
        warmup=args.warmup,
        seed=args.seed,
        eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval,
        max_time=args.max_time,
        parallel=args.parallel,
        progress=args.progress,
    )


def run(args):
    apply_training_defaults(args)
    src = resolve_model_dir("smollm2") if args.src == "smollm2" else args.src
    model = load_model(src)
    tokenizer = load_tokenizer(src, required=False)
    teacher = None
    given = [
        f"--{k.replace('_', '-')}"
        for k in ("dynamics", "k", "step_size", "initial_state")
        if getattr(args, k) is not None
    ]
    if getattr(model.config, "model_type", "") != "revllm":
        teacher = model
        for k, v in DYNAMICS_DEFAULTS.items():
            setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
        model = convert(teacher, **dynamics_kwargs(args))  # the model just loaded (src may be a run dir)
    elif given:
        raise RevLLMError(
            f"{args.src} is already a converted {model.config.dynamics} model: {', '.join(given)} "
            "apply only when SRC is an original model (convert it again from the original)"
        )
    elif args.memory_free != "auto":
        on = args.memory_free == "on"
        if on and not model.dynamics.reversible:
            raise RevLLMError(f"--memory-free on needs a reversible dynamics; {args.src} uses {model.config.dynamics}")
        model.config.memory_free = on
    if args.resume:
        model = None  # the loop restores the student from the run's latest good checkpoint
    if args.teacher:
        teacher = load_model(args.teacher)
    if not args.distill:
        teacher = None
    summary = run_finetune(model, teacher, tokenizer, args.data, args.out, args, distill=args.distill)
    summary.pop("model")
    if summary.get("rank", 0) != 0:  # under torchrun the summary is rank 0's alone
        return 0
    print(json.dumps(summary, indent=1))
    print(f"saved to {Path(args.out) / 'model'}")
    return 0
