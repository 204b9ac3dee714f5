"""Markdown report of one or more training runs: a comparison table and matplotlib PNG plots.

Reads each run's ``summary.json`` (final numbers) and ``metrics.csv`` (curves). Writes
``OUT/report.md``, ``OUT/loss.png`` (train and val loss of all runs on one figure) and
``OUT/memory_throughput.png`` (activation memory, peak memory and tokens/s side by side).
"""

from __future__ import annotations

import csv
import math
from io import BytesIO
from pathlib import Path

from matplotlib.figure import Figure

from ..errors import read_json
from ..io import atomic_write

COLUMNS = [
    ("val_loss", "val loss", "{:.4f}"),
    ("val_ppl", "val ppl", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("activation_mb", "activation MB", "{:.2f}"),
    ("peak_mb", "peak MB", "{:,.0f}"),
    ("params", "params", "{:,}"),
]


def load_run(path) -> dict:
    run = Path(path)
    summary = read_json(run / "summary.json", f"{run} has no summary.json: not a finished `revllm train` run")
    rows = []
    if (run / "metrics.csv").is_file():
        with open(run / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    return {"name": run.name, "path": str(run), "summary": summary, "rows": rows}


def _label(r):
    s = r["summary"]
    kind = "reversible, memory-free" if s.get("memory_free") else "stored activations"
    return f"{r['name']} ({s.get('dynamics')}, {kind})"


def table(runs) -> str:
    head = "| run | dynamics | memory-free | steps | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (4 + len(COLUMNS))]
    for r in runs:
        s = r["summary"]
        cells = [c[2].format(s[c[0]]) if s.get(c[0]) is not None else "-" for c in COLUMNS]
        lines.append(
            f"| {r['name']} | {s.get('dynamics')} | {'yes' if s.get('memory_free') else 'no'} | {s.get('steps')} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _save_png(fig, path: Path) -> None:
    """A pyplot-free Figure (no backend, no global state) written atomically."""
    fig.tight_layout()
    png = BytesIO()
    fig.savefig(png, format="png", dpi=120)
    atomic_write(path, png.getvalue())


def plot_loss(runs, path: Path):
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for i, r in enumerate(runs):
        color = f"C{i}"
        tr = [(int(x["step"]), float(x["train_loss"])) for x in r["rows"] if x.get("train_loss")]
        va = [(int(x["step"]), float(x["val_loss"])) for x in r["rows"] if x.get("val_loss")]
        if tr:
            ax.plot(*zip(*tr), color=color, alpha=0.5, lw=1, label=f"{_label(r)} train")
        if va:
            ax.plot(*zip(*va), color=color, marker="o", lw=2, label=f"{_label(r)} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save_png(fig, path)


def plot_memory_throughput(runs, path: Path):
    names = [r["name"] for r in runs]
    panels = [
        ("activation_mb", "activation memory (MB saved for backward)"),
        ("peak_mb", "peak memory (MB)"),
        ("tokens_per_s", "throughput (tokens/s)"),
    ]
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3)
    for ax, (key, title) in zip(axes, panels):
        vals = [float(r["summary"].get(key) or 0) for r in runs]
        bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(runs))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    _save_png(fig, path)


def write_report(run_paths, out) -> Path:
    runs = [load_run(p) for p in run_paths]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(runs, out / "loss.png")
    plot_memory_throughput(runs, out / "memory_throughput.png")
    s0 = runs[0]["summary"]
    md = [
        "# revllm training report",
        "",
        f"Device: {s0.get('device')}, precision {s0.get('precision')}. Peak memory is "
        + (
            "CUDA max allocated."
            if s0.get("peak_kind") == "cuda_max_allocated"
            else "the training process's peak RSS (CPU), which includes the Python/torch runtime."
        )
        + " Activation memory is what autograd saves for backward in one forward (parameters excluded).",
        "",
        table(runs),
        "",
    ]
    if len(runs) > 1:
        base = min(runs, key=lambda r: bool(r["summary"].get("memory_free")))  # prefer a stored-activation baseline
        for r in runs:
            if r is base:
                continue
            a, b = r["summary"], base["summary"]
            parts = []
            if b.get("activation_mb"):
                parts.append(f"activation memory x{a['activation_mb'] / b['activation_mb']:.3f}")
            if b.get("tokens_per_s"):
                parts.append(f"throughput x{a['tokens_per_s'] / b['tokens_per_s']:.2f}")
            if a.get("val_loss") is not None and b.get("val_loss") is not None and math.isfinite(a["val_loss"]):
                parts.append(f"val loss {a['val_loss'] - b['val_loss']:+.4f}")
            md.append(f"- {r['name']} vs {base['name']}: " + ", ".join(parts))
        md.append("")
    md += ["![loss curves](loss.png)", "", "![memory and throughput](memory_throughput.png)", "", "## Runs", ""]
    for r in runs:
        c = r["summary"].get("config", {})
        md.append(
            f"- `{r['path']}`: {c.get('block')} {c.get('layers')} layers x {c.get('hidden')} hidden, "
            f"{c.get('heads')} heads, seq {c.get('seq_len')}, batch {c.get('batch_size')}x{c.get('grad_accum')}, "
            f"lr {c.get('lr')}, {r['summary'].get('tokens'):,} tokens, {r['summary'].get('wall_s', 0):.0f} s"
        )
    atomic_write(out / "report.md", "\n".join(md) + "\n")
    return out / "report.md"
