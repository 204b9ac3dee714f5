"""Benchmark (issue 14): the O(1)-memory conversion recipe on SmolLM2-135M-Instruct, and the memory-quality frontier.

Same evaluation as benchmarks/convert_smollm2.py (held-out: the last 1,024 tokens of the KJV, windows of 512;
distillation windows of 128 drawn from the rest with the same seeded sampler, batch 4, AdamW, constant lr,
no clipping), so a run here with no hard layer and layer weight 0 is that script's retrofit distillation.

  run:    one conversion distilled for --tokens, free-running held-out perplexity at every mark; written to
          benchmarks/results/convert_o1/NAME.json at each mark (a killed run keeps its curve so far).
  cost:   saved bytes for backward (30 layers, batch 4x128) and step time relative to ordinary fine-tuning,
          measured interleaved in one process (shared machine: ratios only).
  report: gathers the runs into benchmarks/results/convert_o1.{json,md,png}.

Usage:
  PYTHONPATH=. python benchmarks/convert_o1.py run --name NAME --dynamics leapfrog --hard-layers auto \\
      --layer-weight 1 --layer-weight-end 0 --tokens 12800
  PYTHONPATH=. python benchmarks/convert_o1.py run --name k2 --dynamics midpoint_a --k 2 --lr 5e-5 --tokens 12800
  PYTHONPATH=. python benchmarks/convert_o1.py run --name prog --hard-layers auto --tokens 51200 --progressive 50
  PYTHONPATH=. python benchmarks/convert_o1.py cost
  PYTHONPATH=. python benchmarks/convert_o1.py report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from convert_smollm2 import kjv_text  # noqa: E402

from revllm.convert import convert  # noqa: E402
from revllm.convert.o1 import (  # noqa: E402
    O1DistillLoss,
    ProgressiveConversion,
    auto_hard_layers,
    calibrate,
    parse_hard_layers,
)
from revllm.eval import evaluate_perplexity  # noqa: E402
from revllm.io import latest_good, load_model, save_model_atomic, smollm2_model_dir, verify  # noqa: E402
from revllm.train.checkpoint import load_trainer_state, save_checkpoint  # noqa: E402

RESULTS = Path(os.environ.get("REVLLM_BENCH_OUT", Path(__file__).parent / "results"))
RUNS = RESULTS / "convert_o1"
MARKS = (6144, 12800, 25600, 51200, 102400, 204800, 409600)


def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = args.source or smollm2_model_dir()  # --source: another HF model directory (the tests' tiny model)
    tok = AutoTokenizer.from_pretrained(d)
    orig = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor(tok(kjv_text(args.kjv), add_special_tokens=False)["input_ids"])
    held, train = ids[-args.eval_tokens :], ids[: -args.eval_tokens - 1]  # held-out: the end of Revelation
    return orig, held, train, tok


def sampler(train, args):
    rng = torch.Generator().manual_seed(0)  # as convert_smollm2.py: the same windows in the same order

    def batch():
        s = torch.randint(0, len(train) - args.seq_len, (args.batch_size,), generator=rng)
        return torch.stack([train[i : i + args.seq_len] for i in s.tolist()])

    return rng, batch


def hard_layers(orig, train, spec, seq_len):
    layers = parse_hard_layers(spec, orig.config.num_hidden_layers)
    if layers != "auto":
        return layers, None
    n = 4 * 2 * seq_len  # as `revllm convert --memory o1`: the first 2 batches of 4 windows
    scores = calibrate(orig, list(train[:n].view(2, 4, seq_len)))
    return auto_hard_layers(scores), scores


def build(orig, train, args):
    if args.dynamics == "midpoint_a":  # near-Euler frontier rows: exact, a k-bit buffer per layer
        return convert(orig, dynamics="midpoint_a", k=args.k), [], None
    stored, scores = hard_layers(orig, train, args.hard_layers, args.seq_len)
    model = convert(
        orig,
        dynamics=args.dynamics,
        step_size=args.step_size,
        initial_state=args.initial_state,
        stored_layers=stored or None,
    )
    return model, stored, scores


# What a resumed run must share with the run it continues (anything else would splice two recipes).
RECIPE = ("dynamics", "k", "step_size", "initial_state", "hard_layers", "layer_weight", "layer_weight_end",
          "tokens", "lr", "lr_end", "warmup", "seq_len", "batch_size", "eval_tokens", "eval_seq_len",
          "branch_from", "progressive", "progressive_order")  # fmt: skip
# What a branch may change from the run it branches off (the schedule); everything else must match.
SCHEDULE = ("tokens", "lr", "lr_end", "warmup", "branch_from")


def _recipe(args) -> dict:
    r = {k: getattr(args, k) for k in RECIPE} | {"source": str(args.source or "smollm2")}
    r["progressive_order"] = args.progressive_order if args.progressive else None  # older runs: None
    return r | {"branch_from": str(args.branch_from) if args.branch_from else None}


def recipe_diff(theirs: dict, mine: dict, ignore=()) -> list[str]:
    """The recipe keys on which a checkpoint's run and this one differ. A key added to RECIPE after that
    run was written (lr_end, branch_from) was None there, its default, so older checkpoints still resume."""
    theirs = dict.fromkeys(RECIPE) | {"source": "smollm2"} | theirs
    return sorted(k for k, v in mine.items() if k not in ignore and theirs.get(k) != v)


def _branch(args):
    """(student, optimizer state, rng states, result so far, step) of the checkpoint ``--branch-from`` names:
    a new run that continues another one's student, AdamW moments and data position under another schedule."""
    ckpt = verify(args.branch_from)
    meta, opt_state, rng = load_trainer_state(ckpt)
    parent = meta["res"]["recipe"]
    mine = _recipe(args)
    diff = recipe_diff(parent, mine, ignore=SCHEDULE)
    if diff:
        raise SystemExit(f"convert_o1: --branch-from {ckpt} was run with other settings ({', '.join(diff)})")
    step = meta["step"]
    if step * args.batch_size * args.seq_len >= args.tokens:
        raise SystemExit(f"convert_o1: --branch-from {ckpt} is at step {step}, already past --tokens {args.tokens}")
    res = meta["res"] | {"branch": {"from": str(ckpt), "parent": meta["res"]["name"], "step": step}}
    return load_model(ckpt / "model"), opt_state, rng, res, step


def _header(args, stored, scores) -> dict:
    return {
        "name": args.name,
        "command": " ".join(sys.argv),
        "recipe": _recipe(args),
        "dynamics": args.dynamics,
        "k": args.k if args.dynamics == "midpoint_a" else None,
        "hard_layers": stored,
        "calibration": scores,
        "layer_weight": args.layer_weight,
        "layer_weight_end": args.layer_weight_end,
        "lr": args.lr,
        "warmup": args.warmup,
        "batch": f"{args.batch_size}x{args.seq_len}",
        "budget_tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "curve": [],
    }


def _resume(args, run_dir):
    """(student, optimizer state, rng states, result so far, step) from the newest good checkpoint, or None."""
    ckpt = latest_good(run_dir)
    if ckpt is None:
        return None
    meta, opt_state, rng = load_trainer_state(ckpt)
    diff = recipe_diff(meta["res"]["recipe"], _recipe(args))
    if diff:
        raise SystemExit(f"convert_o1: {run_dir} was run with other settings ({', '.join(diff)}); refusing to resume")
    return load_model(ckpt / "model"), opt_state, rng, meta["res"], meta["step"]


def _save(run_dir, step, model, tok, opt, sched, batch_rng, res):
    """A checkpoint whose model/ is a complete HF directory (tokenizer included): `revllm eval` reads it."""
    rng = {"sampler": batch_rng.get_state(), "torch": torch.get_rng_state()}
    save_checkpoint(run_dir, step, model, tok, opt, sched, {"res": res}, rng, keep_last=1)


def run(args):
    torch.manual_seed(0)
    orig, held, train, tok = load(args)
    run_dir = args.run_dir or Path("runs/convert_o1") / args.name
    model, stored, scores = build(orig, train, args)
    res, start = _header(args, stored, scores), 0
    resumed = _resume(args, run_dir) if args.resume else None
    if resumed is None and args.branch_from:
        resumed = _branch(args)
        resumed[3].update({k: v for k, v in _header(args, stored, scores).items() if k not in ("curve", "calibration")})
    if resumed is None and args.resume is False and latest_good(run_dir, "found") is not None:
        raise SystemExit(f"convert_o1: {run_dir} holds checkpoints; pass --resume, or another --run-dir")
    steps = -(-args.tokens // (args.batch_size * args.seq_len))
    ev = lambda m: evaluate_perplexity(m, held, seq_len=args.eval_seq_len, batch_size=4)["perplexity"]  # noqa: E731
    batch_rng, batch = sampler(train, args)
    if args.progressive is not None and not 1 <= args.progressive <= steps:
        raise SystemExit(f"convert_o1: --progressive {args.progressive} must be between 1 and the run's {steps} steps")
    prog = None
    if args.progressive:  # the layers switch from the residual step to the rule one by one (issue 14)
        prog = ProgressiveConversion(orig.config.num_hidden_layers, stored, args.progressive, args.progressive_order)
    if resumed is not None:
        model, opt_state, rng, res, start = resumed
        batch_rng.set_state(rng["sampler"])
        torch.set_rng_state(rng["torch"])
        res["command"] = " ".join(sys.argv)
        print(f"{args.name}: continuing from step {start} ({res.get('branch', {}).get('from', run_dir)})", flush=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    # linear warm-up, then constant (as convert_smollm2.py), or linear to --lr-end from the branch point
    s0 = res.get("branch", {}).get("step", 0)
    end = 1.0 if args.lr_end is None else args.lr_end / args.lr

    def factor(s):
        return min(1.0, (s + 1) / (args.warmup + 1)) * (1 + (end - 1) * max(0, s - s0) / max(1, steps - s0))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if resumed is not None:
        opt.load_state_dict(opt_state)
        sched.last_epoch = start
        for g in opt.param_groups:  # the lr of step `start` under this run's schedule
            g["lr"] = args.lr * factor(start)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    if prog is not None:
        prog.apply(model, start - 1)  # the student as the last step left it (all residual before step 0)
    if resumed is None:
        res["curve"].append({"tokens": 0, "perplexity": ev(model)})
        print(args.name, res["curve"][-1], "hard layers", stored, flush=True)
    loss_fn = O1DistillLoss(orig, args.layer_weight, args.layer_weight_end, steps, start_step=start, progressive=prog)
    t0 = time.perf_counter() - res.get("seconds", 0.0)
    tokens = start * args.batch_size * args.seq_len
    marks = [m for m in MARKS if tokens < m < args.tokens] + [args.tokens]
    stop = min(steps, args.stop_after) if args.stop_after else steps
    model.train()
    for step in range(start, stop):
        loss, met = loss_fn(model, {"input_ids": batch()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tokens += args.batch_size * args.seq_len
        print(
            f"{args.name} step {step + 1}/{steps} tokens {tokens} kl {met['kl']:.4f} "
            f"layer_err {met.get('layer_err', 0):.4g} w {met['layer_weight']:.3g} "
            + ("" if prog is None else f"residual {met['residual_layers']} ")
            + f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        mark = bool(marks) and tokens >= marks[0]
        if mark:
            marks = [m for m in marks if m > tokens]
            model.eval()
            res["curve"].append(
                {
                    "tokens": tokens,
                    "perplexity": ev(model),
                    "layer_weight": met["layer_weight"],
                    "kl": met["kl"],
                    "layer_err": met.get("layer_err"),
                    **({"residual_layers": met["residual_layers"]} if prog is not None else {}),
                }
            )
            model.train()
            print(args.name, res["curve"][-1], flush=True)
        res.update(seconds=time.perf_counter() - t0, steps=step + 1, partial=step + 1 < steps)
        if mark or (step + 1) % args.ckpt_every == 0 or step + 1 == stop:
            _save(run_dir, step + 1, model, tok, opt, sched, batch_rng, res)
        if mark:
            _write_json(RUNS / f"{args.name}.json", res)
    if args.save and stop == steps:  # the final student, for `revllm eval` (zero-shot tasks)
        save_model_atomic(model.eval(), args.save, tok)


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# -- cost: saved bytes at 30 layers and step time relative to ordinary fine-tuning --------------------------
def cost(args):
    from revllm.convert.distill import DistillLoss
    from revllm.memory import SavedBytes

    orig, held, train, _ = load(args)
    _, batch = sampler(train, args)
    xs = [batch() for _ in range(args.rounds + 1)]
    rows = {
        "ordinary fine-tuning (CE, stored)": None,
        "near-Euler k=4 (exact, memory-free)": dict(dynamics="midpoint_a", k=4),
        "near-Euler k=1 (exact, memory-free)": dict(dynamics="midpoint_a", k=1),
        "o1 leapfrog, 0 hard layers": dict(dynamics="leapfrog"),
        "o1 leapfrog, 2 hard layers + layer term": dict(dynamics="leapfrog", stored_layers=[11, 12]),
    }
    models, losses = {}, {}
    for name, kw in rows.items():
        if kw is None:
            import copy

            models[name] = copy.deepcopy(orig).train()
            losses[name] = lambda m, b: (m(input_ids=b["input_ids"], labels=b["input_ids"]).loss, {})
        else:
            models[name] = convert(orig, **kw).train()
            lw = 1.0 if "layer term" in name else 0.0
            losses[name] = O1DistillLoss(orig, lw, lw, 1) if lw else DistillLoss(orig)
    out = {n: {"seconds": []} for n in rows}
    for r in range(args.rounds + 1):  # interleaved rounds; round 0 warms up
        for name in rows:
            m, fn = models[name], losses[name]
            t0 = time.perf_counter()
            with SavedBytes(m, orig) as meter:
                loss, _ = fn(m, {"input_ids": xs[r]})
            loss.backward()
            m.zero_grad(set_to_none=True)
            if r:
                out[name]["seconds"].append(time.perf_counter() - t0)
            out[name]["saved_mib"] = meter.bytes / 2**20
            print(r, name, out[name], flush=True)
    base = sorted(out["ordinary fine-tuning (CE, stored)"]["seconds"])
    for name, kw in rows.items():
        s = sorted(out[name]["seconds"])
        out[name]["median_s"] = s[len(s) // 2]
        out[name]["time_vs_ordinary"] = s[len(s) // 2] / base[len(base) // 2]
        k = (kw or {}).get("k") if (kw or {}).get("dynamics") == "midpoint_a" else None
        # the k-bit buffer is held on the Function's context, not in save_for_backward: added from its size
        n_el = args.batch_size * args.seq_len * orig.config.hidden_size
        out[name]["kbit_buffer_mib"] = (k * n_el * orig.config.num_hidden_layers / 8 / 2**20) if k else 0.0
    # flat in depth: the O(1) model (2 stored layers) cut to its first n layers, saved bytes of one step
    depth = {}
    o1 = models["o1 leapfrog, 2 hard layers + layer term"]  # layers 11, 12: the cost of any 2 stored layers
    for n in (14, 22, 30):
        m = convert(orig, dynamics="leapfrog", stored_layers=[11, 12]).train()
        m.model.layers = m.model.layers[:n]
        with SavedBytes(m) as meter:
            loss = m(input_ids=xs[0], labels=xs[0]).loss
        loss.backward()
        depth[n] = meter.bytes / 2**20
        print("depth", n, depth[n], flush=True)
    del o1
    _write_json(
        RUNS / "_cost.json",
        {
            "command": " ".join(sys.argv),
            "batch": f"{args.batch_size}x{args.seq_len}",
            "rounds": args.rounds,
            "rows": out,
            "saved_mib_by_depth_o1_2hard": depth,
        },
    )


# -- report -------------------------------------------------------------------------------------------------
def report(args):
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json")) if not p.stem.startswith("_")}
    cost_rows = json.loads((RUNS / "_cost.json").read_text()) if (RUNS / "_cost.json").is_file() else None
    prior = json.loads((RESULTS / "convert_smollm2.json").read_text())
    original = prior["before"]["original"]["perplexity"]
    L = 30
    md = [
        "# O(1)-memory conversion of SmolLM2-135M-Instruct (issue 14)",
        "",
        "CPU, 2 cores, shared with other jobs (timings are ratios measured interleaved). Held-out: the last 1,024",
        "tokens of the KJV (windows of 512), never distilled on; batch 4x128; free-running perplexity.",
        f"Original: {original:.2f}.",
        "",
        "## Runs (held-out perplexity at each token mark)",
        "",
        "| run | rule | hard layers | layer weight | lr | " + " | ".join(f"{m:,}" for m in MARKS) + " |",
        "|---|---|---|---|---|" + "---|" * len(MARKS),
    ]
    for name, r in runs.items():
        at = {p["tokens"]: p["perplexity"] for p in r["curve"]}
        left = {p["tokens"]: p.get("residual_layers") for p in r["curve"]}
        # a progressive run's early marks are partly residual models (O(L) memory): say how many layers
        cells = [f"{at[m]:.4g}" + (f" ({left[m]} residual)" if left[m] else "") if m in at else "" for m in MARKS]
        rule = r["dynamics"] + (f" k={r['k']}" if r.get("k") is not None else "")
        if r.get("recipe", {}).get("progressive"):
            rule += f", progressive {r['recipe']['progressive_order']} over {r['recipe']['progressive']} steps"
        md.append(
            f"| {name}{' (partial)' if r.get('partial') else ''} | {rule} | {r['hard_layers'] or '–'} | "
            f"{r['layer_weight']:g}→{r['layer_weight_end']:g} | {_lr_cell(r)} | " + " | ".join(cells) + " |"
        )
    md += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in runs.values())]
    # frontier at the 12,800-token budget: average bits per element per layer vs quality
    budget = 12800
    front = []
    for name, r in runs.items():
        at = {p["tokens"]: p["perplexity"] for p in r["curve"] if not p.get("residual_layers")}
        if budget in at:
            bits = r["k"] if r.get("k") is not None else 32 * len(r["hard_layers"] or []) / L
            front.append((name, bits, at[budget]))
    # the same budget from benchmarks/convert_smollm2.py (same held-out passage, sampler, batch; its own lr)
    for name, r in prior["distill"].items():
        at = {p["tokens"]: p["perplexity"] for p in r["curve"]}
        if budget in at and "anneal" not in name and "lr" not in name:
            bits = int(name.split("k=")[1]) if name.startswith("midpoint_a k=") else 0
            front.append((f"{name} (convert_smollm2, lr {r['lr']:g}, no hard layer)", bits, at[budget]))
    md += [
        "",
        f"## Frontier after {budget:,} distillation tokens",
        "",
        "Bits per element per layer: near-Euler k keeps k bits per element at every layer; the O(1) recipe keeps",
        "one fp32 stream per stored hard layer (32 bits x hard layers / 30 layers); all-O(1) keeps none. The two",
        "held streams and the weights/optimizer are the same for every row and not counted.",
        "",
        "| run | bits/element/layer | perplexity | vs original |",
        "|---|---|---|---|",
    ]
    for name, bits, ppl in sorted(front, key=lambda t: -t[1]):
        md.append(f"| {name} | {bits:.2f} | {ppl:.4g} | {ppl / original:.2f}x |")
    if cost_rows:
        md += [
            "",
            f"## Cost (30 layers, batch {cost_rows['batch']}, median of {cost_rows['rounds']} interleaved rounds)",
            "",
            "Distillation rows include the frozen teacher's forward; ordinary fine-tuning has none. The stored layers",
            "in the cost rows are 11 and 12 (any two stored layers cost the same: one fp32 stream each).",
            "",
            "| step | saved for backward (MiB) | + k-bit buffer (MiB) | time vs ordinary fine-tuning |",
            "|---|---|---|---|",
        ]
        for name, c in cost_rows["rows"].items():
            md.append(f"| {name} | {c['saved_mib']:.1f} | {c['kbit_buffer_mib']:.1f} | {c['time_vs_ordinary']:.2f}x |")
        d = cost_rows.get("saved_mib_by_depth_o1_2hard", {})
        md += [
            "",
            "O(1) leapfrog with layers 11, 12 stored, cut to its first n layers, saved for backward (CE step): "
            + ", ".join(f"{n} layers {v:.1f} MiB" for n, v in d.items()),
        ]
        md += ["", f"Command: `{cost_rows['command']}`"]
    _write_json(
        RESULTS / "convert_o1.json",
        {"original": original, "runs": runs, "frontier_budget": budget, "frontier": front, "cost": cost_rows},
    )
    (RESULTS / "convert_o1.md").write_text("\n".join(md) + "\n")
    _plot(runs, front, original, budget)


def _lr_cell(r: dict) -> str:
    end = r.get("recipe", {}).get("lr_end")
    if end is None:
        return f"{r['lr']:g}"
    b = r.get("branch")
    since = (
        f" from {b['step'] * r['recipe']['batch_size'] * r['recipe']['seq_len']:,} tokens ({b['parent']})" if b else ""
    )
    return f"{r['lr']:g} → {end:g}{since}"


def _plot(runs, front, original, budget):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, r in runs.items():
        c = [p for p in r["curve"] if p["tokens"] > 0]
        a.plot([p["tokens"] for p in c], [p["perplexity"] for p in c], marker="o", label=name)
    a.axhline(original, color="k", lw=0.8, ls="--", label="original")
    a.set(
        xscale="log",
        yscale="log",
        xlabel="distillation tokens",
        ylabel="held-out perplexity",
        title="free-running perplexity",
    )
    a.legend(fontsize=7)
    for name, bits, ppl in front:
        b.scatter(bits, ppl)
        b.annotate(name.split(" (")[0], (bits, ppl), fontsize=7, rotation=20)
    b.axhline(original, color="k", lw=0.8, ls="--")
    b.set(
        yscale="log",
        xlabel="bits per element per layer (memory beyond O(1))",
        ylabel="held-out perplexity",
        title=f"frontier after {budget:,} tokens",
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "convert_o1.png", dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["run", "cost", "report"])
    ap.add_argument("--name")
    ap.add_argument("--dynamics", default="leapfrog", choices=["midpoint", "leapfrog", "hamiltonian", "midpoint_a"])
    ap.add_argument("--k", type=int, default=4, help="midpoint_a rows: a = 2^-k")
    ap.add_argument("--step-size", type=float, default=None)
    ap.add_argument("--initial-state", default="fixed_point")
    ap.add_argument("--hard-layers", default="none")
    ap.add_argument("--layer-weight", type=float, default=0.0)
    ap.add_argument("--layer-weight-end", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, default=12800)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--save", type=Path, default=None, help="run: save the final student here")
    ap.add_argument("--kjv", type=Path, default=Path(".cache/assets/kjv.txt"))
    ap.add_argument("--source", type=Path, default=None, help="an HF model directory instead of SmolLM2")
    ap.add_argument("--run-dir", type=Path, default=None, help="run: checkpoints (default runs/convert_o1/NAME)")
    ap.add_argument("--ckpt-every", type=int, default=25, help="run: checkpoint every N steps and at each mark")
    ap.add_argument("--resume", action="store_true", help="run: continue from the newest good checkpoint")
    ap.add_argument("--lr-end", type=float, default=None, help="run: lr falls linearly to this (default: constant)")
    ap.add_argument("--branch-from", type=Path, default=None, help="run: start from another run's checkpoint dir")
    ap.add_argument("--stop-after", type=int, default=None, help="run: stop (resumably) after this many steps")
    ap.add_argument(
        "--progressive", type=int, default=None, help="run: switch the layers to the rule one by one over N steps"
    )
    ap.add_argument("--progressive-order", default="up", choices=["up", "down"], help="run: layer 0 first, or last")
    args = ap.parse_args()
    if args.mode == "run" and not args.name:
        ap.error("run needs --name")
    {"run": run, "cost": cost, "report": report}[args.mode](args)


if __name__ == "__main__":
    main()
