"""Benchmark: converting SmolLM2-135M-Instruct into reversible models, before and after distillation.

Measures, on CPU:
  1. held-out perplexity (KJV passage) of the original and of each conversion before training:
     euler, near-Euler midpoint_a at k = 1, 2, 4, 6, and the paper's retrofit (midpoint, leapfrog,
     hamiltonian; h = 1, fixed-point initial state), plus KL(original || converted);
  2. a short distillation of the near-Euler k = 4 model (time-budgeted), held-out perplexity after;
  3. optional a-annealing (k 4 -> 0) during a second short distillation;
  4. per-step time and saved-activation bytes of a distillation step vs ordinary fine-tuning of the
     original with and without gradient checkpointing.
Writes benchmarks/results/convert_smollm2.{json,md,png}. Not a test (minutes of CPU).

Usage: PYTHONPATH=. python benchmarks/convert_smollm2.py --kjv /tmp/kjv.txt [--distill-minutes 10]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from revllm.convert import convert
from revllm.convert.distill import AnnealA, DistillLoss
from revllm.eval import evaluate_perplexity, kl_divergence
from revllm.io import smollm2_model_dir
from revllm.memory import SavedBytes, rss_bytes
from revllm.memory import peak_rss_bytes as max_rss_bytes

OUT = Path(os.environ.get("REVLLM_BENCH_OUT", Path(__file__).parent / "results"))  # probes write elsewhere


def kjv_text(path: Path) -> str:
    """Plain prose: drop book/chapter headings and verse numbers."""
    lines = []
    for line in path.read_text().splitlines():
        m = re.match(r"^\s+\d+\s+(.*)$", line)
        if m:
            lines.append(m.group(1))
        elif line.startswith("   ") and lines:
            lines[-1] += " " + line.strip()
    return "\n".join(lines)


# Step-cost rows: (model, loss, options). "hf" is the original model under cross-entropy, "distill" a
# conversion (options as for `convert`) distilled from the frozen original.
COST_ROWS = {
    "original fine-tune (CE)": ("hf", {}),
    "original fine-tune (CE), activation checkpointing": ("hf", {"checkpointing": True}),
    "distill midpoint_a k=4 (exact, memory-free)": ("distill", dict(dynamics="midpoint_a", k=4)),
    "distill midpoint_a k=4 (exact, stored)": ("distill", dict(dynamics="midpoint_a", k=4, memory_free=False)),
    "distill midpoint (float, memory-free)": ("distill", dict(dynamics="midpoint")),
}


def _cost_row(name, batches):
    """One COST_ROWS row in this (fresh) process: s/step, saved-activation MiB, peak RSS MiB."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    kind, kw = COST_ROWS[name]
    orig = AutoModelForCausalLM.from_pretrained(smollm2_model_dir(), dtype=torch.float32)
    if kind == "hf":
        model, loss_fn = orig, lambda m, b: (m(input_ids=b["input_ids"], labels=b["input_ids"]).loss, {})
        if kw.get("checkpointing"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model, loss_fn = convert(orig, **kw), DistillLoss(orig.eval(), temperature=1.0)
    loaded = rss_bytes()
    sec, act = step_cost(model, loss_fn, batches)
    peak = max_rss_bytes()
    return {
        "s_per_step": sec,
        "saved_activations_mib": act,
        "peak_rss_mib": peak / 2**20,
        "peak_over_loaded_mib": (peak - loaded) / 2**20,
    }


def step_cost(model, loss_fn, batches, lr=1e-5):
    """Mean seconds per optimizer step and saved-activation MiB of one step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    times, act = [], None
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        with SavedBytes(model, getattr(loss_fn, "teacher", torch.nn.Module())) as meter:
            loss, _ = loss_fn(model, {"input_ids": x})
        b = meter.bytes
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # first step warms up allocators
            times.append(time.perf_counter() - t0)
        act = b / 2**20
    return sum(times) / len(times), act


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kjv", type=Path, default=Path(".cache/assets/kjv.txt"))
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--distill-minutes", type=float, default=10.0)
    ap.add_argument(
        "--distill-tokens",
        type=int,
        default=0,
        help="stop each distillation after this many tokens (0 = only the time budget applies)",
    )
    ap.add_argument("--distill-lr", type=float, default=None, help="learning rate of the distillations (default --lr)")
    ap.add_argument(
        "--distill",
        nargs="+",
        default=["midpoint_a k=4"],
        help="conversions to distill, by their name in the before-training table (e.g. leapfrog)",
    )
    ap.add_argument("--anneal-minutes", type=float, default=0.0)
    ap.add_argument(
        "--anneal-tokens",
        type=int,
        default=0,
        help="a-annealing run (k 4 -> 0) of this many tokens: k falls over the first 80%%, the rest trains at k=0",
    )
    ap.add_argument("--cost-steps", type=int, default=3)
    ap.add_argument(
        "--phases",
        default="before,distill,cost",
        help="comma list of before, distill, cost; results of other phases are kept from the JSON",
    )
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    orig = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor(tok(kjv_text(args.kjv), add_special_tokens=False)["input_ids"])
    n_held = args.eval_tokens
    held, train = ids[-n_held:], ids[: -n_held - 1]  # held-out: the end of Revelation; never trained on
    old = OUT / "convert_smollm2.json"
    res = json.loads(old.read_text()) if old.is_file() else {"before": {}, "distill": {}, "cost": {}}
    res.setdefault("commands", [res.pop("command")] if "command" in res else [])
    res["commands"].append(" ".join(sys.argv))
    res.update(
        {
            "machine": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
            "torch": torch.__version__,
            "held_out_tokens": int(len(held)),
        }
    )
    ev = lambda m: evaluate_perplexity(m, held, seq_len=args.eval_seq_len, batch_size=4)["perplexity"]  # noqa: E731

    # -- 1. before training --------------------------------------------------------------------------
    if "before" in phases:
        res["before"]["original"] = {"perplexity": ev(orig), "kl": 0.0}
    recipes = [
        ("euler", {}),
        *[(f"midpoint_a k={k}", {"dynamics": "midpoint_a", "k": k}) for k in (6, 4, 2, 1)],
        ("midpoint", {"dynamics": "midpoint"}),
        ("leapfrog", {"dynamics": "leapfrog"}),
        ("hamiltonian", {"dynamics": "hamiltonian"}),
        ("midpoint h=0.5 copy", {"dynamics": "midpoint", "step_size": 0.5, "initial_state": "copy"}),
    ]
    for name, kw in recipes if "before" in phases else []:
        kw = kw or {"dynamics": "euler"}
        m = convert(orig, **kw)
        res["before"][name] = {"perplexity": ev(m), "kl": kl_divergence(orig, m, held, seq_len=args.eval_seq_len)}
        print(name, res["before"][name], flush=True)
        del m
    _write(res)

    # -- 2. distillation of near-Euler k=4, time-budgeted -------------------------------------------
    loss_fn = DistillLoss(orig, temperature=1.0)
    rng = torch.Generator().manual_seed(0)

    def batch():
        s = torch.randint(0, len(train) - args.seq_len, (args.batch_size,), generator=rng)
        return torch.stack([train[i : i + args.seq_len] for i in s.tolist()])

    def distill(model, minutes, anneal=None, label="", max_tokens=None):
        lr = args.distill_lr or args.lr

        def result(partial):  # partial results are written at every mark, so a killed run keeps its curve
            r = {
                "curve": curve,
                "steps": step,
                "tokens": tokens,
                "seconds": time.perf_counter() - t0,
                "memory_free": bool(model.config.memory_free),
                "lr": lr,
            }
            return {**r, "partial": True} if partial else r

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        curve, tokens, t0, step = [{"tokens": 0, "perplexity": ev(model)}], 0, time.perf_counter(), 0
        budget = minutes * 60
        marks = [12_800, 25_600, 51_200, 102_400, 204_800]
        max_tokens = max_tokens or args.distill_tokens
        while time.perf_counter() - t0 < budget and not (max_tokens and tokens >= max_tokens):
            k = anneal(model, step) if anneal else None
            loss, met = loss_fn(model, {"input_ids": batch()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, tokens = step + 1, tokens + args.batch_size * args.seq_len
            print(f"{label} step {step} tokens {tokens} kl {met['kl']:.4f} k {k}", flush=True)
            # evaluate at the token marks, and (annealing) at the end of each k level
            next_k = anneal.k_at(step) if anneal else k
            if (marks and tokens >= marks[0]) or next_k != k:
                marks = [t for t in marks if t > tokens]
                curve.append({"tokens": tokens, "perplexity": ev(model), "k": k})
                print(label, curve[-1], flush=True)
                res["distill"][label] = result(partial=True)
                _write(res)
        if curve[-1]["tokens"] != tokens:
            curve.append({"tokens": tokens, "perplexity": ev(model), "k": k})
        return result(partial=False)

    for name in args.distill if "distill" in phases else []:
        known = dict(recipes)
        if name not in known:
            raise SystemExit(f"--distill {name!r} is unknown; choose from: {', '.join(known)}")
        m = convert(orig, **(known[name] or {"dynamics": "euler"}))
        res["distill"][name] = distill(m, args.distill_minutes, label=name)
        _write(res)
    if args.anneal_minutes > 0 or args.anneal_tokens > 0:
        m = convert(orig, dynamics="midpoint_a", k=4)
        if args.anneal_tokens:
            est_steps, minutes = args.anneal_tokens // (args.batch_size * args.seq_len), 1e9
        else:
            est_steps = max(1, res["distill"]["midpoint_a k=4"]["steps"] * args.anneal_minutes / args.distill_minutes)
            minutes = args.anneal_minutes
        res["distill"]["midpoint_a k=4->0 annealed"] = distill(
            m,
            minutes,
            AnnealA(4, 0, int(est_steps * 0.8)),
            label="midpoint_a k=4->0 annealed",
            max_tokens=args.anneal_tokens or None,
        )
        _write(res)

    # -- 3. step cost ----------------------------------------------------------------------------------
    if "cost" not in phases:
        return
    xs = [batch() for _ in range(args.cost_steps)]
    res["cost"] = {}
    ctx = mp.get_context("spawn")  # a fresh process per row: ru_maxrss is then that row's peak alone
    for name in COST_ROWS:
        with ctx.Pool(1) as pool:
            res["cost"][name] = pool.apply(_cost_row, (name, xs))
        print(name, res["cost"][name], flush=True)
    res["cost_batch"] = f"{args.batch_size}x{args.seq_len}"
    _write(res)


def _write(res):
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / "convert_smollm2.json.tmp"  # atomic: a run killed mid-write keeps the previous JSON
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, OUT / "convert_smollm2.json")
    md = [
        f"# SmolLM2-135M-Instruct conversion ({res['machine']})",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in res.get("commands", [res.get("command")])),
        "",
        f"Held-out: last {res['held_out_tokens']} tokens of the KJV (end of Revelation), verse numbers removed.",
        "",
        "## Before training",
        "",
        "| conversion | perplexity | KL(original ‖ converted), nats/token |",
        "|---|---|---|",
    ]
    for name, r in res["before"].items():
        md.append(f"| {name} | {r['perplexity']:.4g} | {r['kl']:.4g} |")
    if res["distill"]:
        md += [
            "",
            "## Distillation (KL to the original, T = 1)",
            "",
            "| model | lr | tokens | steps | seconds | memory-free | perplexity before → after |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in res["distill"].items():
            c = r["curve"]
            md.append(
                f"| {name}{' (partial: run stopped)' if r.get('partial') else ''} | {r.get('lr', 5e-5):g} | {r['tokens']} | {r['steps']} | {r['seconds']:.0f} | {r['memory_free']} | "
                f"{c[0]['perplexity']:.4g} → {c[-1]['perplexity']:.4g} |"
            )
        md += [
            "",
            "Curves (tokens: perplexity): "
            + "; ".join(
                f"{n}: " + ", ".join(f"{p['tokens']}: {p['perplexity']:.4g}" for p in r["curve"])
                for n, r in res["distill"].items()
            ),
        ]
    if res["cost"]:
        md += [
            "",
            f"## Step cost (batch {res.get('cost_batch')})",
            "",
            "Each row in a fresh process; peak = RSS high-water mark (weights, optimizer state and, for",
            "distillation, the frozen teacher included); over loaded = peak minus RSS after loading the models.",
            "",
            "| step | s/step | tokens/s | saved activations (MiB) | peak RSS (MiB) | peak over loaded (MiB) |",
            "|---|---|---|---|---|---|",
        ]
        b, t = map(int, res["cost_batch"].split("x"))
        for name, r in res["cost"].items():
            md.append(
                f"| {name} | {r['s_per_step']:.2f} | {b * t / r['s_per_step']:.0f} | "
                f"{r['saved_activations_mib']:.1f} | {r['peak_rss_mib']:.0f} | {r['peak_over_loaded_mib']:.0f} |"
            )
    (OUT / "convert_smollm2.md").write_text("\n".join(md) + "\n")
    _plot(res)


def _plot(res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    names = list(res["before"])
    orig = res["before"]["original"]["perplexity"]
    ax = axes[0]
    ax.barh(names, [res["before"][n]["perplexity"] for n in names], color="tab:blue")
    ax.set_xscale("log")
    ax.axvline(orig, color="k", lw=0.8, ls="--")
    ax.set_xlabel("held-out perplexity (log)")
    ax.set_title("before training")
    ax.invert_yaxis()
    # Near-Euler runs sit within a few % of the original, the retrofits start at 1e5-1e17: two scales.
    near = {n: r for n, r in res["distill"].items() if n.startswith("midpoint_a k=") and "anneal" not in n}
    far = {n: r for n, r in res["distill"].items() if n not in near}
    for ax, runs, title in (
        (axes[1], near, "distillation: near-Euler (linear)"),
        (axes[2], far, "distillation: retrofits, annealing (log)"),
    ):
        for n, r in runs.items():
            ax.plot([p["tokens"] for p in r["curve"]], [p["perplexity"] for p in r["curve"]], marker="o", label=n)
        ax.axhline(orig, color="k", lw=0.8, ls="--", label="original")
        ax.set_xlabel("distillation tokens")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(OUT / "convert_smollm2.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
