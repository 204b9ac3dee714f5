"""``revllm convert SRC OUT``: a pretrained HF model (dir, .gguf, or ``smollm2``) -> a reversible one.

Optionally reports the distance to the original before training (``--report-text``: perplexity of both
and KL(original || converted)) and distills right away (``--distill DATA``, same options as finetune).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..convert import SUPPORTED, convert, save_converted
from ..errors import RevLLMError
from ..eval import evaluate_perplexity, kl_divergence, read_text_tokens
from ..io import atomic_write, load_source, load_source_tokenizer, resolve_model_dir, save_model_atomic
from .common import add_dynamics_args, dynamics_kwargs
from .finetune import add_training_args, apply_training_defaults, run_finetune


def add_parser(sub):
    p = sub.add_parser("convert", help="convert a pretrained GPT-2/Llama/Qwen2 model into a reversible one",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="HF model directory, .gguf file, or 'smollm2'")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    add_dynamics_args(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--report-text", help="text file: report perplexity of both models and KL before training")
    p.add_argument("--report-tokens", type=int, default=4096, help="tokens of --report-text to score (default 4096)")
    p.add_argument("--distill", metavar="DATA", help="distill right after converting, on a token dir from `revllm data` "
                   "(the run goes to OUT.run; --resume continues it)")
    add_training_args(p)
    p.set_defaults(func=run)


def run(args):
    out = Path(args.out).resolve()
    if args.resume and not args.distill:
        raise RevLLMError("--resume continues a --distill run: give --distill DATA too")
    # Refuse before any work, not after it. On --resume, OUT may hold the stopped run's own conversion.
    ours = args.resume and (out / "conversion_report.json").is_file()
    if out.exists() and not ours and (not out.is_dir() or any(out.iterdir())):
        raise RevLLMError(f"output {out} exists and is not an empty directory")
    seq_len = args.seq_len  # as given (the training defaults fill in 128 below)
    apply_training_defaults(args)
    if args.report_tokens < 2:
        raise RevLLMError(f"--report-tokens={args.report_tokens} must be >= 2 (one prediction needs two tokens)")
    dtype = getattr(torch, args.dtype)
    src_path = resolve_model_dir("smollm2") if args.src == "smollm2" else args.src
    original = load_source(src_path, dtype, SUPPORTED)
    max_pos = getattr(original.config, "max_position_embeddings", None)  # (GPT-2's n_positions maps to it)
    if seq_len and max_pos and seq_len > max_pos:
        raise RevLLMError(f"--seq-len {seq_len} exceeds the source model's {max_pos} positions")
    # the report's windows: --seq-len, else 128 capped at the model's positions
    win = seq_len or min(128, max_pos or 128)
    tokenizer = load_source_tokenizer(src_path)
    model = convert(original, dtype=dtype, **dynamics_kwargs(args))
    report = {"source": str(args.src), "dynamics": args.dynamics, "k": args.k if args.dynamics == "midpoint_a" else None,
              "initial_state": args.initial_state, "step_size": model.config.step_size}
    if args.report_text:
        if tokenizer is None:
            raise ValueError("--report-text needs the source's tokenizer, and none was found")
        ids = read_text_tokens(tokenizer, args.report_text)[: args.report_tokens]
        report["original_ppl"] = evaluate_perplexity(original, ids, seq_len=win)["perplexity"]
        report["converted_ppl"] = evaluate_perplexity(model, ids, seq_len=win)["perplexity"]
        report["kl_original_converted"] = kl_divergence(original, model, ids, seq_len=win)
        report["report_tokens"] = len(ids)
        print(f"| model | perplexity |\n|---|---|\n| original | {report['original_ppl']:.3f} |\n"
              f"| converted ({args.dynamics}) | {report['converted_ppl']:.3f} |\n"
              f"KL(original || converted) = {report['kl_original_converted']:.4g} nats/token over {len(ids)} tokens")
    if args.distill:
        # --resume: the student comes from the run's latest good checkpoint, not from this conversion
        summary = run_finetune(None if args.resume else model, original, tokenizer, args.distill,
                               out.with_name(out.name + ".run"), args, distill=True)
        model = summary.pop("model")
        if model is None:  # torchrun: ranks > 0 trained alongside; rank 0 alone writes OUT
            return 0
        report["distill"] = summary
    # (resumed: the whole directory, report included, is swapped for the new one)
    out = save_converted(model, out, tokenizer) if not ours else save_model_atomic(model, out, tokenizer)
    atomic_write(out / "conversion_report.json", json.dumps(report, indent=1))
    print(f"saved {args.dynamics} conversion of {args.src} to {out}")
    return 0
