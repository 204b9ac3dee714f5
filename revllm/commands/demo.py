"""``revllm demo``: the README's main job.

1. finds the default corpus (``.cache/assets/kjv.txt`` from scripts/assets.sh: the King James Bible from
   Debian's bible-kjv-text; or the Shakespeare fallback), or ``--corpus`` files;
2. tokenizes it with SmolLM2's tokenizer (``revllm data``);
3. trains the same small Llama-family model twice -- reversible midpoint with the memory-free backward,
   and euler (the standard residual network, stored activations) -- each in its own process, so each
   run's peak RSS is its own;
4. prints a comparison table and writes ``OUT/report/report.md`` with plots.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import RevLLMError
from .common import offline, positive_float

DEMO_MARK = ".revllm-demo"
# Sized for about 2-3 minutes per run on 2 CPU cores (see docs/notes/issue3.md for measurements).
DEMO_MODEL = ["--block", "llama", "--layers", "4", "--hidden", "128", "--heads", "4", "--kv-heads", "2",
              "--seq-len", "128", "--batch-size", "8", "--lr", "2e-3", "--min-lr", "2e-4", "--warmup", "20",
              "--loss-chunk-size", "256", "--eval-iters", "8", "--keep-last", "1", "--seed", "0"]


def add_parser(sub):
    p = sub.add_parser("demo", help="train reversible (midpoint) vs standard (euler) on the default corpus and compare")
    p.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    p.add_argument("--corpus", nargs="+", help="text files/folders to use instead of the default corpus")
    p.add_argument("--dynamics", default="midpoint", choices=["midpoint", "leapfrog", "midpoint_a", "hamiltonian"],
                   help="reversible dynamics to compare with euler (default midpoint)")
    p.add_argument("--max-time", type=positive_float, default=200.0, help="safety limit per run in seconds (default 200)")
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
    offline()
    from rich.console import Console
    from rich.table import Table

    from ..data import prepare_tokens, read_meta
    from ..train.report import write_report

    if args.steps < 1:
        raise RevLLMError("--steps must be >= 1")
    console = Console()
    t0 = time.perf_counter()
    out = Path(args.out)
    for dyn in (args.dynamics, "euler"):  # the demo replaces only run dirs it made itself (marked)
        if (out / dyn).exists() and not (out / dyn / DEMO_MARK).is_file():
            raise RevLLMError(f"{out / dyn} exists and was not made by `revllm demo`: choose another --out")
    corpus = [Path(c) for c in args.corpus] if args.corpus else default_corpus()
    data = out / "data"
    try:
        meta = read_meta(data)
        fresh = meta.get("requested") != [str(p) for p in corpus]
    except (RevLLMError, FileNotFoundError):
        meta, fresh = None, True
    if meta is None or fresh or meta["tokenizer"]["source"] != args.tokenizer:
        console.print(f"[bold]1/3 tokenizing[/] {', '.join(map(str, corpus))} with {args.tokenizer}")
        meta = prepare_tokens(corpus, data, tokenizer=args.tokenizer)
    console.print(f"    {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {meta['tokenizer']['vocab_size']}")

    runs, stop_after = [], None
    for i, dyn in enumerate([args.dynamics, "euler"]):
        run_dir = out / dyn
        shutil.rmtree(run_dir, ignore_errors=True)  # checked above: a run dir of an earlier demo
        run_dir.mkdir(parents=True)
        (run_dir / DEMO_MARK).write_text("made by revllm demo; replaced by the next demo run\n")
        kind = "reversible, memory-free backward" if dyn != "euler" else "standard residual, stored activations"
        console.print(f"[bold]{2 + i}/3 training[/] {dyn} ({kind}), {args.steps} steps")
        interval = max(1, args.steps // 5)
        cmd = [sys.executable, "-m", "revllm.cli", "train", "--data", str(data), "--out", str(run_dir), "--dynamics", dyn,
               "--max-steps", str(args.steps), "--eval-interval", str(interval), "--checkpoint-interval", str(args.steps),
               "--log-interval", str(max(1, interval // 4)), "--max-time", str(args.max_time), *DEMO_MODEL]
        if stop_after:  # the first run hit --max-time: stop the second at the same step, same schedule
            cmd += ["--stop-after", str(stop_after)]
        rc = subprocess.call(cmd)  # own process: peak RSS per run, and the child's errors print as one line
        if rc != 0:
            raise RevLLMError(f"training {dyn} failed (exit {rc})")
        runs.append(run_dir)
        first = json.loads((run_dir / "summary.json").read_text())
        if i == 0 and first["steps"] < args.steps:
            stop_after = first["steps"]
            console.print(f"    {dyn} stopped at step {stop_after} (--max-time); euler stops there too")

    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    table = Table(title="reversible vs standard residual (same model, same data, same seed)")
    for col in ("run", "memory-free", "steps", "val loss", "tokens/s", "activation MB", "peak MB"):
        table.add_column(col, justify="right" if col not in ("run",) else "left")
    for r, s in zip(runs, summaries):
        table.add_row(f"{r.name}", "yes" if s["memory_free"] else "no", str(s["steps"]), f"{s['val_loss']:.4f}",
                      f"{s['tokens_per_s']:,.0f}", f"{s['activation_mb']:.2f}", f"{s['peak_mb']:,.0f}")
    console.print(table)
    report = write_report(runs, out / "report")
    console.print(f"report: {report}   (total {time.perf_counter() - t0:.0f} s)")
