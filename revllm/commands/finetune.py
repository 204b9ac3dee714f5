"""``revllm finetune SRC --data DATA --out RUN``: distill (default) or SFT a (converted) model.

SRC is a converted revllm model, or an original HF model / .gguf / ``smollm2`` which is first converted
with ``--dynamics/--k`` (the original then serves as the teacher). For a model that is already converted,
distillation needs ``--teacher``. DATA is a ``revllm data`` token dir (train.bin) or a UTF-8 text file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--steps", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--warmup", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T (loss scaled by T^2)")
    g.add_argument("--ce-weight", type=float, default=0.0, help="weight of the added cross-entropy on the text")
    g.add_argument("--hidden-weight", type=float, default=0.0, help="weight of final-hidden-state matching (MSE)")
    g.add_argument("--lora", type=int, default=0, metavar="R", help="train LoRA adapters of rank R (peft), merged on save")
    g.add_argument("--anneal-a", type=int, default=None, metavar="K_END",
                   help="midpoint_a: step k down to K_END (a = 2^-k toward 1) over the run")


def add_parser(sub):
    from .convert import add_dynamics_args

    p = sub.add_parser("finetune", help="distillation or supervised fine-tuning of a converted model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="converted revllm model, or an HF dir / .gguf / 'smollm2' to convert first")
    p.add_argument("--data", required=True, help="token dir (revllm data) or text file")
    p.add_argument("--out", required=True, help="run directory (model saved to RUN/model)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--distill", dest="distill", action="store_true", default=True, help="KL to the teacher (default)")
    mode.add_argument("--sft", dest="distill", action="store_false", help="plain cross-entropy on DATA")
    p.add_argument("--teacher", help="teacher model (default: SRC itself when SRC is an original HF model)")
    add_dynamics_args(p)
    add_training_args(p)
    p.set_defaults(func=run)


def _load_tokens(data, tokenizer):
    from ..eval.perplexity import read_text_tokens, read_token_dir

    d = Path(data)
    if d.is_dir():
        return read_token_dir(d, "train")
    if tokenizer is None:
        raise ValueError(f"{data} is a text file but the model has no tokenizer to tokenize it")
    return read_text_tokens(tokenizer, d)


def run_finetune(model, teacher, tokenizer, data, out, args, distill: bool) -> dict:
    from ..convert.distill import AnnealA, DistillLoss
    from ..convert.finetune import add_lora, finetune

    loss_fn = None
    if distill:
        if teacher is None:
            raise ValueError("distillation needs a teacher: pass --teacher ORIGINAL (or use --sft)")
        loss_fn = DistillLoss(teacher, args.temperature, args.ce_weight, args.hidden_weight)
    anneal = None
    if args.anneal_a is not None:
        k0 = round(-__import__("math").log2(model.config.midpoint_a)) if model.config.dynamics == "midpoint_a" else None
        if k0 is None:
            raise ValueError("--anneal-a needs a midpoint_a model")
        anneal = AnnealA(k0, args.anneal_a, args.steps)
    if args.lora:
        model = add_lora(model, r=args.lora)
    tokens = _load_tokens(data, tokenizer)
    return finetune(model, tokens, out, loss_fn=loss_fn, steps=args.steps, batch_size=args.batch_size,
                    seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, seed=args.seed, anneal=anneal,
                    tokenizer=tokenizer)


def run(args):
    from ..convert import convert, load_source
    from ..eval.load import load_model, load_tokenizer, offline, resolve_model_dir
    from .convert import dynamics_kwargs

    offline()
    src = resolve_model_dir("smollm2") if args.src == "smollm2" else args.src
    model = load_model(src)
    tokenizer = load_tokenizer(src, required=False)
    teacher = None
    if getattr(model.config, "model_type", "") != "revllm":
        teacher = model
        model = convert(load_source(src), **dynamics_kwargs(args))
    if args.teacher:
        teacher = load_model(args.teacher)
    if not args.distill:
        teacher = None
    summary = run_finetune(model, teacher, tokenizer, args.data, args.out, args, distill=args.distill)
    summary.pop("model")
    print(json.dumps(summary, indent=1))
    print(f"saved to {Path(args.out) / 'model'}")
    return 0
