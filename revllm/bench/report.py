"""Result files: ``benchmarks/results/<table>_<machine>.{json,md,png}``.

The JSON is the record (setup, machine, command, every row, skipped rows with their reason); the
Markdown and PNG are rendered from it, so ``revllm bench report`` can rebuild them at any time.
"""

from __future__ import annotations

import json
import statistics
from io import BytesIO
from pathlib import Path

from matplotlib.figure import Figure

from ..errors import RevLLMError
from ..io import atomic_write
from .allocator import growth_ratio, step_time_ratio
from .capacity import relative
from .configs import config_kind
from .finetune import fits

TABLES = ("memory", "speed", "capacity", "finetune", "allocator")
# Paper (arXiv 2512.02056) Table 4: reversible over baseline throughput at max batch, d=512, 8 heads.
PAPER_TABLE4 = {16: 20.7, 32: 24.1, 64: 48.8, 96: 101.0}
MiB = 2**20


def stem_of(result: dict) -> str:
    """File stem of a result: <name (default: the table)>_<machine tag>."""
    return f"{result.get('name') or result['table']}_{result['machine_tag']}"


def save(result: dict, out_dir: str | Path) -> list[Path]:
    """Write the JSON record, then its Markdown table and (memory, capacity) PNG plot."""
    out_dir = Path(out_dir)
    stem = stem_of(result)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    atomic_write(paths[0], json.dumps(result, indent=1) + "\n")
    atomic_write(paths[1], render_markdown(result))
    png = plot(result, out_dir / f"{stem}.png")
    return paths + ([png] if png else [])


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RevLLMError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(result, dict) or result.get("table") not in TABLES or "rows" not in result:
        raise RevLLMError(f"{path} is not a revllm bench result (needs 'table' in {TABLES} and 'rows')")
    return result


def rebuild(results_dir: str | Path) -> list[Path]:
    """Re-render every ``*.json`` result under ``results_dir``; returns the files written."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise RevLLMError(f"results directory {results_dir} does not exist")
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise RevLLMError(f"no benchmark results (memory_*.json, speed_*.json, capacity_*.json) in {results_dir}")
    written = []
    for f in files:  # each file's own stem: the JSON is only read, never rewritten under another name
        result = load(f)
        atomic_write(f.with_suffix(".md"), render_markdown(result))
        png = plot(result, f.with_suffix(".png"))
        written += [f.with_suffix(".md")] + ([png] if png else [])
    return written


# -- Markdown -----------------------------------------------------------------------------------------
def _header(result: dict) -> list[str]:
    m, s = result["machine"], result["setup"]
    dev = m.get("gpu", f"CPU {m['cpu']}, {m['cores']} cores")
    shape = ", ".join(f"{k}={v}" for k, v in s.items())
    partial = (
        " PARTIAL: the run was still going or was interrupted; missing rows were not measured."
        if result.get("partial")
        else ""
    )
    threads = f", {m['torch_threads']} torch thread(s)" if "torch_threads" in m else ""
    return [
        f"Machine: {dev}{threads}; torch {m['torch']}; device {m['device']}. Measured {result['created']}.{partial}",
        f"Setup: {shape}.",
        f"Command: `{result['command']}`",
        "",
    ]


def _mib(b) -> str:
    return f"{b / MiB:,.1f}"


def _cell(row: dict, key: str, fmt) -> str:
    if row.get("ok"):
        return fmt(row[key])
    return f"skipped: {row.get('reason', '?')}" + (f" ({row['detail']})" if row.get("detail") else "")


def render_markdown(result: dict) -> str:
    return "\n".join(_RENDERERS[result["table"]](result)) + "\n"


def _md_memory(result):
    rows, depths = result["rows"], result["setup"]["depths"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by = {(r["config"], r["layers"]): r for r in rows}
    peak_label = "max_memory_allocated" if result["machine"]["device"] == "cuda" else "RSS high-water mark"
    out = ["# Memory vs depth", ""] + _header(result)
    for title, key in [
        (f"Peak memory, whole process, as users see it (MiB; {peak_label})", "peak_bytes"),
        ("Bytes saved for backward (MiB, unique storages, parameters excluded)", "saved_bytes"),
        (
            f"Peak memory of the step above the resident model (MiB; {peak_label}, grads preallocated)",
            "peak_step_bytes",
        ),
    ] + (
        [("Peak reserved by torch's caching allocator (MiB; max_memory_reserved)", "peak_reserved_bytes")]
        if result["machine"]["device"] == "cuda"
        else []
    ):
        out += [
            f"## {title}",
            "",
            "| config | " + " | ".join(f"L={d}" for d in depths) + " |",
            "|---|" + "---:|" * len(depths),
        ]
        for c in configs:
            cells = [_cell(by[(c, d)], key, _mib) if (c, d) in by else "" for d in depths]
            out.append(f"| ({config_kind(c)}) {c} | " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "## Target: memory-free activation memory at the deepest row <= 1.1x the shallowest",
        "",
        "| config | saved ratio | peak-step ratio | met |",
        "|---|---:|---:|---|",
    ]
    for c in configs:
        if config_kind(c) != "c":
            continue
        ok = [by[(c, d)] for d in depths if by.get((c, d), {}).get("ok")]
        if len(ok) < 2:
            out.append(f"| {c} | n/a | n/a | not measured |")
            continue
        lo, hi = ok[0], ok[-1]
        sr = hi["saved_bytes"] / max(lo["saved_bytes"], 1)
        pr = hi["peak_step_bytes"] / max(lo["peak_step_bytes"], 1)
        out.append(
            f"| {c} (L={lo['layers']}->{hi['layers']}) | {sr:.3f} | {pr:.3f} | "
            f"{'yes' if sr <= 1.1 else 'no'} (saved bytes) |"
        )
    return out


def _md_allocator(result):
    rows, s = result["rows"], result["setup"]
    depths, variants = s["depths"], s["allocators"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by = {(r["config"], r["layers"], r["variant"]): r for r in rows}
    out = ["# Whole-process peak of training vs depth, per allocator setting", ""] + _header(result)
    out += [
        f"Each row a fresh process: {s['steps']} AdamW steps from cold. Growth = peak RSS minus the RSS of "
        "the built model with its gradients (MiB).",
        "",
        "| config | allocator | " + " | ".join(f"L={d}" for d in depths) + " |",
        "|---|---|" + "---:|" * len(depths),
    ]
    for c in configs:
        for v in variants:
            cells = [_cell(by[(c, d, v)], "growth_bytes", _mib) if (c, d, v) in by else "" for d in depths]
            out.append(f"| ({config_kind(c)}) {c} | {v} | " + " | ".join(cells) + " |")
    mf = [c for c in configs if config_kind(c) == "c"]
    st = [c for c in configs if config_kind(c) in ("a", "d")]
    out += [
        "",
        "## Target: memory-free growth of the peak, shallowest to deepest, <= 10% of the stored model's",
        "",
        "| allocator | memory-free growth (MiB) | stored growth (MiB) | ratio | met |",
        "|---|---:|---:|---:|---|",
    ]
    for v in variants:
        g = growth_ratio(rows, v, mf[0], st[0]) if mf and st else None
        if g:
            out.append(f"| {v} | {_mib(g[0])} | {_mib(g[1])} | {100 * g[2]:.1f}% | {'yes' if g[2] <= 0.10 else 'no'} |")
    out += [
        "",
        "## Step time, interleaved (median step after the first, geometric mean over the rows above)",
        "",
        "| allocator | wall time vs system | CPU time (user + system) vs system |",
        "|---|---:|---:|",
    ]
    for v in variants[1:]:
        r, c = step_time_ratio(rows, v), step_time_ratio(rows, v, key="step_cpu_times")
        out.append(f"| {v} | {'n/a' if r is None else f'{r:.3f}x'} | {'n/a' if c is None else f'{c:.3f}x'} |")
    return out + _md_kernel_work(rows, configs, depths, variants)


def _md_kernel_work(rows, configs, depths, variants):
    """The allocator's own cost, per step: kernel (system) seconds and minor page faults, and the kernel
    seconds added over glibc's default as a share of the default's step time."""
    if not any("step_sys_times" in r for r in rows):
        return []
    med = lambda r, k: statistics.median(r[k][1:] or r[k])  # noqa: E731
    by = {(r["config"], r["layers"], r["variant"]): r for r in rows if r.get("ok") and "step_sys_times" in r}
    out = [
        "",
        "## The allocator's own work per step (median after the first step): kernel seconds, minor page faults,",
        "and the kernel seconds added over glibc's default as a share of its step time",
        "",
        "| config | layers | allocator | kernel s/step | minor faults/step | added kernel time |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for c in configs:
        for d in depths:
            base = by.get((c, d, "system"))
            for v in variants:
                r = by.get((c, d, v))
                if r is None:
                    continue
                sys_s, faults = med(r, "step_sys_times"), med(r, "step_minor_faults")
                added = ""
                if base is not None:
                    added = f"{100 * (sys_s - med(base, 'step_sys_times')) / med(base, 'step_times'):+.1f}%"
                out.append(f"| {c} | {d} | {v} | {sys_s:.3f} | {faults:,.0f} | {added} |")
    return out


def _md_finetune(result):
    rows, s = result["rows"], result["setup"]
    out = ["# Fine-tuning SmolLM2-135M-Instruct: peak memory and speed", ""] + _header(result)
    out += [
        f"Each row a fresh process: {s['warmup']}, then {s['steps']} timed step(s) (forward, backward, AdamW). "
        "Peak = the process's peak RSS during the timed steps, model and optimizer state included; "
        "load = the peak while loading.",
        "",
        "| mode | config | batch x seq | peak (MiB) | load peak (MiB) | s/step | tokens/s | CPU s/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["mode"], r["batch"] > 1, r["seq"], r["batch"])):
        shape = f"{r['batch']} x {r['seq']}"
        if r.get("ok"):
            cpu = f"{r['cpu_s_per_step']:.1f}" if "cpu_s_per_step" in r else "-"
            out.append(
                f"| {r['mode']} | {r['config']} | {shape} | {_mib(r['peak_bytes'])} | "
                f"{_mib(r['load_peak_bytes'])} | {r['s_per_step']:.2f} | {r['tokens_per_s']:,.0f} | {cpu} |"
            )
        else:
            out.append(f"| {r['mode']} | {r['config']} | {shape} | {_cell(r, '', str)} | | | | |")
    for budget in s.get("budgets") or []:
        f = fits(rows, budget)
        out += [
            "",
            f"## What fits in {budget / 2**30:g} GiB (measured peak, loading included; of the shapes measured)",
            "",
            "| mode | config | longest sequence at batch 1 | largest batch at 1,024 tokens |",
            "|---|---|---:|---:|",
        ]
        for (c, m), cell in sorted(f.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            out.append(f"| {m} | {c} | {cell['seq'] or 'none'} | {cell['batch'] or 'none'} |")
    return out


def _md_speed(result):
    rows = result["rows"]
    out = ["# Step time at the same batch", ""] + _header(result)
    out += [
        "Full step = forward + backward + AdamW; configurations interleaved in one process; median of "
        f"{result['setup']['repeats']} steps after {result['setup']['warmup']} warm-up step(s).",
        "",
        "| config | batch | median step (s) | tokens/s | ratio to (a) | <= 1.35x |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if not r.get("ok", True):
            out.append(f"| ({config_kind(r['config'])}) {r['config']} | {r['batch']} | {_cell(r, '', str)} | | | |")
            continue
        ratio = r.get("ratio_to_a")
        meets = "" if ratio is None or config_kind(r["config"]) != "c" else ("yes" if ratio <= 1.35 else "no")
        out.append(
            f"| ({config_kind(r['config'])}) {r['config']} | {r['batch']} | {r['median_s']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {'' if ratio is None else f'{ratio:.2f}x'} | {meets} |"
        )
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        out += [
            "",
            "## Profile of one step (operators by self time, share of the step)",
            "",
            "| config | batch | top operators |",
            "|---|---:|---|",
        ]
        for r in profiled:
            ops = "; ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in r["profile"]["top"][:6])
            out.append(f"| {r['config']} | {r['batch']} | {ops} |")
    return out


def _md_capacity(result):
    rows, s = result["rows"], result["setup"]
    out = ["# Max batch under a memory budget, and throughput at that batch", ""] + _header(result)
    out += [
        f"Sequence length {s['seq']}, {s['dtype']}. Budget per row (none = the card). Doubling then bisection "
        f"(tolerance {s.get('tolerance', 0)}), each probe a full forward + backward + AdamW step in a fresh process; "
        f"tokens/s over {s.get('steps')} timed steps at the max batch.",
        "",
        "| layers | config | budget (MiB) | max batch | tokens/s | vs (a) | vs (b) | paper rev. vs baseline |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        budget = r.get("budget_bytes", s.get("budget_bytes"))
        budget = "card" if budget is None else _mib(budget)
        mb = (
            "0 (batch 1 does not fit)"
            if r["max_batch"] == 0
            else f"{r['max_batch']}" + ("+" if r.get("capped") else "")
        )
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        va = f"{r['vs_a']:+.1f}%" if r.get("vs_a") is not None else ""
        vb = f"{r['vs_b']:+.1f}%" if r.get("vs_b") is not None else ""
        paper = (
            f"+{PAPER_TABLE4[r['layers']]}%" if config_kind(r["config"]) == "c" and r["layers"] in PAPER_TABLE4 else ""
        )
        out.append(
            f"| {r['layers']} | ({config_kind(r['config'])}) {r['config']} | {budget} | {mb} | {tps} | {va} | {vb} | {paper} |"
        )
    out += ["", "Paper: bf16 on one GPU, sequence length not stated in the paper; ours: the setup line above."]
    return out


_RENDERERS = {
    "memory": _md_memory,
    "speed": _md_speed,
    "capacity": _md_capacity,
    "finetune": _md_finetune,
    "allocator": _md_allocator,
}  # one per table in TABLES


# -- plots --------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> Path | None:
    if result["table"] in ("speed", "allocator"):
        return None
    rows = result["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    if result["table"] == "finetune":
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        fig = Figure(figsize=(5.5 * len(modes), 4.2))
        axes = fig.subplots(1, len(modes), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for c in configs:
                pts = sorted(
                    (r["seq"], r["peak_bytes"] / MiB)
                    for r in rows
                    if r["config"] == c and r["mode"] == mode and r["batch"] == 1 and r.get("ok")
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=c)
            ax.set(
                xlabel="sequence length (batch 1)",
                ylabel="peak RSS (MiB)",
                title=f"{mode} fine-tuning",
                xscale="log",
                yscale="log",
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    elif result["table"] == "memory":
        fig = Figure(figsize=(11, 4.2))
        axes = fig.subplots(1, 2)
        for ax, key, title in [
            (axes[0], "saved_bytes", "bytes saved for backward"),
            (axes[1], "peak_step_bytes", "peak step memory above model"),
        ]:
            for c in configs:
                pts = [(r["layers"], r[key] / MiB) for r in rows if r["config"] == c and r.get("ok")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"({config_kind(c)}) {c}")
            ax.set(xlabel="layers", ylabel="MiB", title=title, xscale="log", yscale="log")
            ax.set_xticks(result["setup"]["depths"], [str(d) for d in result["setup"]["depths"]])
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
    else:
        fig = Figure(figsize=(11, 4.2))
        axes = fig.subplots(1, 2)
        depths = sorted({r["layers"] for r in rows})
        width = 0.8 / max(len(configs), 1)
        for i, c in enumerate(configs):
            xs = [k + i * width for k, d in enumerate(depths)]
            get = {r["layers"]: r for r in rows if r["config"] == c}
            axes[0].bar(
                xs, [get.get(d, {}).get("max_batch", 0) for d in depths], width, label=f"({config_kind(c)}) {c}"
            )
            axes[1].bar(xs, [get.get(d, {}).get("tokens_per_s") or 0 for d in depths], width)
        for ax, t in [(axes[0], "max batch under budget"), (axes[1], "tokens/s at max batch")]:
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(depths))], [f"{d} layers" for d in depths])
            ax.set_title(t)
        axes[0].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"{result['table']} — {m.get('gpu', m['cpu'])} ({m['device']})", fontsize=9)
    fig.tight_layout()
    png = BytesIO()
    fig.savefig(png, format="png", dpi=110)  # a Figure without pyplot: no backend, no global state
    atomic_write(path, png.getvalue())
    return path


SHAPE_KEYS = ("d", "heads", "seq", "batch", "vocab", "block", "loss_chunk", "device", "dtype", "compile")
ROW_KEYS = {
    "memory": ("config", "layers"),
    "speed": ("config", "batch"),
    "capacity": ("config", "layers"),
    "finetune": ("config", "mode", "seq", "batch"),
}


def merge(results: list[dict]) -> dict:
    """One table from several runs of it (e.g. configurations run in parallel processes).

    The model shape and machine must agree; rows are united (a later run's row replaces an earlier one
    with the same configuration and depth/batch); every run's command is kept.
    """
    if not results:
        raise RevLLMError("nothing to merge")
    first = results[0]
    for r in results[1:]:
        if (r["table"], r["machine_tag"]) != (first["table"], first["machine_tag"]):
            raise RevLLMError(
                f"cannot merge a {r['table']} table from {r['machine_tag']} into a "
                f"{first['table']} table from {first['machine_tag']}"
            )
        diff = [k for k in SHAPE_KEYS if r["setup"].get(k) != first["setup"].get(k)]
        if diff:
            raise RevLLMError(f"cannot merge runs with different {', '.join(diff)}")
    key = ROW_KEYS[first["table"]]
    rows: dict[tuple, dict] = {}
    for r in results:
        for row in r["rows"]:
            rows[tuple(row[k] for k in key)] = row
    configs = list(dict.fromkeys(k[0] for k in rows))
    merged_rows = sorted(rows.values(), key=lambda row: (configs.index(row["config"]), *(row[k] for k in key[1:])))
    if first["table"] == "capacity":
        merged_rows = sorted(merged_rows, key=lambda row: row["layers"])
        relative(merged_rows)
    setup = dict(first["setup"])
    for k in ("depths", "batches"):
        if k in setup:
            setup[k] = sorted({v for r in results for v in r["setup"].get(k, [])})
    for k in setup:  # run options that differ between the inputs (budget, time limit): each row keeps its own
        if (
            k not in SHAPE_KEYS
            and k not in ("depths", "batches")
            and any(r["setup"].get(k) != setup[k] for r in results)
        ):
            setup[k] = "per run (see commands)"
    # Partial only if a (configuration, depth/batch) cell is still missing: an interrupted input whose
    # rows are all present (or re-measured by another input) leaves nothing out.
    axis = setup.get("depths") or setup.get("batches") or []
    complete = all((c, x) in rows for c in configs for x in axis)
    out = {
        **first,
        "name": first.get("name") or first["table"],
        "setup": setup,
        "rows": merged_rows,
        "command": " ; ".join(dict.fromkeys(r["command"] for r in results)),
        "created": max(r["created"] for r in results),
        "partial": not complete and any(r.get("partial") for r in results),
    }
    return out
