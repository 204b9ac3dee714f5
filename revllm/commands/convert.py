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
from ..convert.o1 import O1_RULES
from ..convert.o1 import prepare as prepare_o1
from ..errors import RevLLMError
from ..eval import evaluate_perplexity, kl_divergence, read_text_tokens
from ..io import atomic_write, load_source, load_source_tokenizer, resolve_model_dir, save_model_atomic
from .common import DYNAMICS_DEFAULTS, add_dynamics_args, dynamics_kwargs
from .finetune import add_training_args, apply_training_defaults, run_finetune

# --memory o1's defaults (the recipe chosen from measurements: docs/notes/issue14.md).
# Measured on SmolLM2 (docs/notes/issue14.md): with the 2 calibrated hard layers stored, KL alone reached held-out
# perplexity 120 after 6,144 tokens, KL + the per-layer hidden term (weight 1 -> 0) 302: the term is off by
# default and stays available (--layer-weight).
O1_DEFAULTS = dict(dynamics="leapfrog", hard_layers="auto", layer_weight=0.0, layer_weight_end=0.0)


def add_parser(sub):
    p = sub.add_parser(
        "convert",
        help="convert a pretrained GPT-2/Llama/Qwen2 model into a reversible one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="HF model directory, .gguf file, or 'smollm2'")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    add_dynamics_args(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--report-text", help="text file: report perplexity of both models and KL before training")
    p.add_argument("--report-tokens", type=int, default=4096, help="tokens of --report-text to score (default 4096)")
    p.add_argument(
        "--distill",
        metavar="DATA",
        help="distill right after converting, on a token dir from `revllm data` "
        "(the run goes to OUT.run; --resume continues it)",
    )
    o1 = p.add_argument_group("O(1)-memory recipe (--memory o1; see the README)")
    o1.add_argument(
        "--memory",
        choices=["kbit", "o1"],
        default="kbit",
        help="kbit (default): near-Euler midpoint_a, a k-bit buffer per layer; o1: a rule with no per-layer "
        "buffer (default leapfrog) plus a few stored hard layers, distilled with per-layer hidden matching",
    )
    o1.add_argument(
        "--hard-layers",
        default=None,
        metavar="auto|none|J,K",
        help="o1: layers kept as stored residual layers (default auto: calibrated, at most 2)",
    )
    o1.add_argument(
        "--layer-weight",
        type=float,
        default=None,
        help=f"o1: weight of the per-layer hidden-state term at the start (default {O1_DEFAULTS['layer_weight']:g})",
    )
    o1.add_argument(
        "--layer-weight-end",
        type=float,
        default=None,
        help=f"o1: its weight at the last step, linear in between (default {O1_DEFAULTS['layer_weight_end']:g})",
    )
    add_training_args(p)
    p.set_defaults(func=run, dynamics=None)


def run(args):
    out = Path(args.out).resolve()
    if args.resume and not args.distill:
        raise RevLLMError("--resume continues a --distill run: give --distill DATA too")
    _check_memory_flags(args)
    if args.resume and args.memory != "o1" and (out.with_name(out.name + ".run") / "o1.json").is_file():
        raise RevLLMError(f"{out.name}.run is an O(1) conversion run (o1.json): resume it with --memory o1")
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
    _refuse_converted(src_path, args)
    original = load_source(src_path, dtype, SUPPORTED)
    max_pos = getattr(original.config, "max_position_embeddings", None)  # (GPT-2's n_positions maps to it)
    if seq_len and max_pos and seq_len > max_pos:
        raise RevLLMError(f"--seq-len {seq_len} exceeds the source model's {max_pos} positions")
    # the report's windows: --seq-len, else 128 capped at the model's positions
    win = seq_len or min(128, max_pos or 128)
    tokenizer = load_source_tokenizer(src_path)
    loss_fn = None
    if args.memory == "o1":
        stored, loss_fn, o1_report = prepare_o1(original, tokenizer, args, out.with_name(out.name + ".run"))
        model = convert(original, dtype=dtype, stored_layers=stored or None, **dynamics_kwargs(args))
    else:
        model = convert(original, dtype=dtype, **dynamics_kwargs(args))
    report = {
        "source": str(args.src),
        "dynamics": args.dynamics,
        "k": args.k if args.dynamics == "midpoint_a" else None,
        "initial_state": args.initial_state,
        "step_size": model.config.step_size,
        "memory": args.memory,
    }
    if args.memory == "o1":
        report["o1"] = o1_report
    if args.report_text:
        if tokenizer is None:
            raise ValueError("--report-text needs the source's tokenizer, and none was found")
        ids = read_text_tokens(tokenizer, args.report_text)[: args.report_tokens]
        report["original_ppl"] = evaluate_perplexity(original, ids, seq_len=win)["perplexity"]
        report["converted_ppl"] = evaluate_perplexity(model, ids, seq_len=win)["perplexity"]
        report["kl_original_converted"] = kl_divergence(original, model, ids, seq_len=win)
        report["report_tokens"] = len(ids)
        print(
            f"| model | perplexity |\n|---|---|\n| original | {report['original_ppl']:.3f} |\n"
            f"| converted ({args.dynamics}) | {report['converted_ppl']:.3f} |\n"
            f"KL(original || converted) = {report['kl_original_converted']:.4g} nats/token over {len(ids)} tokens"
        )
    if args.distill:
        # --resume: the student comes from the run's latest good checkpoint, not from this conversion
        summary = run_finetune(
            None if args.resume else model,
            original,
            tokenizer,
            args.distill,
            out.with_name(out.name + ".run"),
            args,
            distill=True,
            loss_fn=loss_fn,
        )
        model = summary.pop("model")
        if model is None:  # torchrun: ranks > 0 trained alongside; rank 0 alone writes OUT
            return 0
        report["distill"] = summary
    # (resumed: the whole directory, report included, is swapped for the new one)
    out = save_converted(model, out, tokenizer) if not ours else save_model_atomic(model, out, tokenizer)
    atomic_write(out / "conversion_report.json", json.dumps(report, indent=1))
    print(f"saved {args.dynamics} conversion of {args.src} to {out}")
    return 0


def _check_memory_flags(args) -> None:
    """--memory o1 picks its own rule; the recipe flags mean nothing without it (refused, not ignored)."""
    given = [
        f"--{k.replace('_', '-')}"
        for k in ("hard_layers", "layer_weight", "layer_weight_end")
        if getattr(args, k) is not None
    ]
    if args.resume and given:
        raise RevLLMError(f"--resume continues the run's own recipe (RUN/o1.json): drop {', '.join(given)}")
    if args.memory != "o1":
        if given:
            raise RevLLMError(f"{', '.join(given)} belong to the O(1) recipe: add --memory o1")
        args.dynamics = args.dynamics or DYNAMICS_DEFAULTS["dynamics"]
        return
    args.dynamics = args.dynamics or O1_DEFAULTS["dynamics"]
    if args.dynamics not in O1_RULES:
        raise RevLLMError(
            f"--memory o1 needs a rule without a per-layer buffer ({', '.join(O1_RULES)}); "
            f"--dynamics {args.dynamics} is not one"
        )
    if not args.distill:
        raise RevLLMError("--memory o1 is a conversion plus distillation: give --distill DATA")
    for k, v in O1_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def _refuse_converted(src_path, args) -> None:
    """SRC must be an original model: a revllm model is already converted (its recipe is fixed)."""
    cfg = Path(src_path) / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "revllm":
        what = " --memory o1" if args.memory == "o1" else ""
        raise RevLLMError(
            f"{args.src} is already a converted revllm model: convert{what} starts from the original "
            "(to keep training a converted model, use `revllm finetune`)"
        )
