"""Issue-20 benchmark: revllm's training step against transformers' own LlamaForCausalLM.

SmolLM2-135M's shape (d=576, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied embeddings),
random weights. One HF model is built from a ``LlamaConfig``; every revllm model is converted from it
with ``revllm.convert`` (the converter's defaults: h = 1, fixed-point initial state; near-Euler is
midpoint_a with a = 2^-4 and exact fixed-point streams) and then shares its weights, so all
configurations compute on the same numbers and the process holds one copy of them.

Each figure is one forward + backward (``loss.backward()``; gradients set to None outside the timing),
the median of ``--rounds`` interleaved rounds (round r runs every configuration once, order rotated by
r), as a ratio to HF without checkpointing. Memory: bytes autograd saves for the backward (weights
excluded) and, on CUDA, the peak allocated during the step.

    python benchmarks/peer_hf.py                             # 12 and 30 layers, fp32 CPU, 5 rounds
    python benchmarks/peer_hf.py --layers 12 --rounds 3 --threads 2
    python benchmarks/peer_hf.py --profile                   # + top ops of one step per configuration
    python benchmarks/peer_hf.py --dtype bf16                # bf16 autocast (the default on CUDA)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from revllm.bench.configs import machine
from revllm.convert import convert
from revllm.memory import SavedBytes

SHAPE = dict(
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=2048,
    hidden_act="silu",
)
# name -> (how it is built, what it holds for the backward)
CONFIGS = {
    "hf": ("HF LlamaForCausalLM", "every layer's activations"),
    "hf_ckpt": ("HF + gradient_checkpointing_enable(use_reentrant=False)", "one input per layer"),
    "euler": ("revllm euler, stored", "every layer's activations"),
    "euler_ckpt": ("revllm euler + checkpointing", "one input per layer"),
    "midpoint_mf": ("revllm midpoint, memory-free", "two streams"),
    "leapfrog_mf": ("revllm leapfrog, memory-free", "two streams"),
    "near_euler_exact": ("revllm near-Euler k=4, exact, memory-free", "two int64 streams + 4 bits/elt/layer"),
}
MiB = 2**20


def build_hf(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPE, num_hidden_layers=layers, attention_dropout=0.0, use_cache=False)
    return LlamaForCausalLM(cfg).train()


def share_weights(rev: nn.Module, hf: nn.Module) -> None:
    """Make ``rev`` compute with ``hf``'s parameter storage (same names; ties kept as ties)."""
    src = dict(hf.named_parameters(remove_duplicate=False))
    made: dict[int, nn.Parameter] = {}
    for name, _ in list(rev.named_parameters(remove_duplicate=False)):
        hp = src[name]
        mod_name, _, attr = name.rpartition(".")
        setattr(rev.get_submodule(mod_name), attr, made.setdefault(id(hp), nn.Parameter(hp.data)))


def build_models(layers: int, seed: int) -> dict[str, nn.Module]:
    hf = build_hf(layers, seed)
    hf_ckpt = build_hf(layers, seed)
    hf_ckpt.load_state_dict(hf.state_dict())
    share_weights(hf_ckpt, hf)
    hf_ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    recipes = {
        "euler": dict(dynamics="euler", memory_free=False),
        "euler_ckpt": dict(dynamics="euler", memory_free=False),
        "midpoint_mf": dict(dynamics="midpoint", memory_free=True),
        "leapfrog_mf": dict(dynamics="leapfrog", memory_free=True),
        "near_euler_exact": dict(dynamics="midpoint_a", k=4),  # exact_reversal, memory-free by default
    }
    models = {"hf": hf, "hf_ckpt": hf_ckpt}
    for name, kw in recipes.items():
        rev = convert(hf, **kw)
        share_weights(rev, hf)
        rev.train()
        if name == "euler_ckpt":
            rev.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        models[name] = rev
    assert models["near_euler_exact"].config.exact_reversal and models["near_euler_exact"].config.memory_free
    return models


CLOCK = time.perf_counter


def step(model, ids, amp: dict) -> float:
    """One forward + backward; seconds of CLOCK."""
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    t = CLOCK()
    with torch.autocast(**amp):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    dt = CLOCK() - t
    model.zero_grad(set_to_none=True)
    return dt


def memory(model, ids, amp: dict) -> dict:
    """Bytes saved for the backward (weights excluded) and, on CUDA, the step's peak allocation."""
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with SavedBytes(model) as saved, torch.autocast(**amp):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    out = {"saved_bytes": saved.bytes}
    if cuda:
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    return out


def profile(model, ids, amp: dict, top: int) -> list[dict]:
    """Top ops of one step by self time (share of the step's total self time, and call counts)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.device.type == "cuda" else [])
    with prof(activities=acts) as p:
        step(model, ids, amp)
    key = "self_device_time_total" if ids.device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in p.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [
        {"op": e.key, "share": getattr(e, key) / total, "count": e.count, "self_us": getattr(e, key)}
        for e in events[:top]
    ]


def run_depth(layers: int, args, device: str, amp: dict) -> dict:
    models = build_models(layers, args.seed)
    names = [n for n in CONFIGS if n in args.configs]
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq), generator=g).to(device)
    for m in models.values():
        m.to(device)
    bar = tqdm(total=(args.warmup + 1 + args.rounds + args.profile) * len(names), desc=f"{layers} layers", unit="step")

    def each(what, fn, models=models):  # bound here: run_depth deletes its name after the last call
        out = {}
        for n in names:
            bar.set_postfix_str(f"{what} {n}")
            out[n] = fn(models[n])
            bar.update()
        return out

    for _ in range(args.warmup):  # allocator, thread pools, lazy inits (the memory pass warms up too)
        each("warm-up", lambda m: step(m, ids, amp))
    mem = each("memory", lambda m: memory(m, ids, amp))
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            bar.set_postfix_str(f"round {r + 1} {n}")
            times[n].append(step(models[n], ids, amp))
            bar.update()
    prof = each("profile", lambda m: profile(m, ids, amp, args.profile_top)) if args.profile else {}
    bar.close()
    med = {n: statistics.median(times[n]) for n in names}
    rows = []
    for n in names:
        row = {
            "config": n,
            "label": CONFIGS[n][0],
            "holds": CONFIGS[n][1],
            "median_s": med[n],
            "times": times[n],
            **mem[n],
        }
        if "hf" in med:
            row["ratio_hf"] = med[n] / med["hf"]
        if "hf_ckpt" in med:
            row["ratio_hf_ckpt"] = med[n] / med["hf_ckpt"]
        if "euler" in med:
            row["ratio_euler"] = med[n] / med["euler"]
        rows.append(row)
    del models
    return {"layers": layers, "rows": rows, "profile": prof}


def render(result: dict) -> str:
    s = result["setup"]
    m = result["machine"]
    sh = s["shape"]
    lines = [
        "# revllm vs transformers' LlamaForCausalLM: one training step (forward + backward)",
        "",
        f"SmolLM2-135M shape (d={sh['hidden_size']}, {sh['num_attention_heads']} heads, "
        f"{sh['num_key_value_heads']} KV heads, intermediate {sh['intermediate_size']}, vocab "
        f"{sh['vocab_size']}, tied embeddings), random weights, **batch {s['batch']}×{s['seq']}**, {s['dtype']}, "
        f"{m['device']} ({m['cpu']}, {m['torch_threads']} threads{', ' + m['gpu'] if 'gpu' in m else ''}), torch {m['torch']}, "
        f"transformers {s['transformers']}. Median of {s['rounds']} interleaved rounds ({s.get('clock', 'wall')} clock); ratio to HF without "
        f"checkpointing. {result.get('note', '')}",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    for d in result["depths"]:
        peak = any("peak_bytes" in r for r in d["rows"])
        lines += [
            f"## {d['layers']} layers",
            "",
            "| configuration | holds for backward | saved for backward (MiB) |"
            + (" peak (MiB) |" if peak else "")
            + " s/step | × HF | × HF+ckpt | × revllm euler stored |",
            "|---|---|---|" + ("---|" if peak else "") + "---|---|---|---|",
        ]
        for r in d["rows"]:
            f = lambda k: f"{r[k]:.3f}" if k in r else "—"  # noqa: E731
            lines.append(
                f"| {r['label']} | {r['holds']} | {r['saved_bytes'] / MiB:,.0f} |"
                + (f" {r['peak_bytes'] / MiB:,.0f} |" if peak else "")
                + f" {r['median_s']:.3f} | {f('ratio_hf')} | {f('ratio_hf_ckpt')} | {f('ratio_euler')} |"
            )
        lines.append("")
    if any(d["profile"] for d in result["depths"]):
        lines += ["## Profile: top ops of one step (share of the step's self time, calls)", ""]
        for d in result["depths"]:
            for n, ops in d["profile"].items():
                lines += [
                    f"**{d['layers']} layers, {CONFIGS[n][0]}**: "
                    + ", ".join(f"`{o['op']}` {100 * o['share']:.1f}% ({o['count']})" for o in ops),
                    "",
                ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = result["depths"]
    names = [r["config"] for r in depths[0]["rows"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / len(depths)
    for k, d in enumerate(depths):
        ratios = [next(r.get("ratio_hf", float("nan")) for r in d["rows"] if r["config"] == n) for n in names]
        ax.bar([i + k * w for i in range(len(names))], ratios, w, label=f"{d['layers']} layers")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + w * (len(depths) - 1) / 2 for i in range(len(names))])
    short = {
        "hf": "HF",
        "hf_ckpt": "HF\n+ ckpt",
        "euler": "revllm euler\nstored",
        "euler_ckpt": "revllm euler\n+ ckpt",
        "midpoint_mf": "midpoint\nmemory-free",
        "leapfrog_mf": "leapfrog\nmemory-free",
        "near_euler_exact": "near-Euler k=4\nexact, mem-free",
    }
    ax.set_xticklabels([short[n] for n in names], fontsize=8)
    ax.set_ylabel("step time / HF plain")
    s = result["setup"]
    ax.set_title(
        f"Step time vs HF LlamaForCausalLM, SmolLM2-135M shape, batch {s['batch']}×{s['seq']}, {s['dtype']}, "
        f"{result['machine']['device']}",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, stem: Path) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = render(result)
    stem.with_suffix(".md").write_text(md)
    plot(result, stem.with_suffix(".png"))
    return md


def merge(paths: list[Path], stem: Path) -> None:
    """One table from runs of the same setup (their depths side by side, each run's command kept)."""
    runs = [json.loads(p.read_text()) for p in paths]
    keep = ("batch", "seq", "dtype", "shape")
    if any({k: r["setup"][k] for k in keep} != {k: runs[0]["setup"][k] for k in keep} for r in runs):
        sys.exit(f"peer_hf: cannot merge runs of different setups ({', '.join(keep)} must match)")
    out = dict(runs[0], depths=[d for r in runs for d in r["depths"]], command=" ; ".join(r["command"] for r in runs))
    out["setup"] = dict(out["setup"], rounds=" / ".join(str(r["setup"]["rounds"]) for r in runs))
    print(write(out, stem.with_name(stem.name + "_" + runs[0].get("tag", "cpu"))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 30])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time, robust on a loaded machine with --threads 1 (CPU only)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration before the memory pass")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--profile", action="store_true", help="also profile one step of each configuration")
    p.add_argument("--profile-top", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text stored with the result (e.g. 'shared machine')")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="peer_hf")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="only unite runs done separately (e.g. one depth each) into one table; runs nothing",
    )
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out / args.name)
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    if dtype == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        p.error("this GPU does not support bf16; pass --dtype fp32")
    amp = dict(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    import transformers

    command = "python benchmarks/peer_hf.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "table": "peer_hf",
        "command": command.strip(),
        "note": args.note,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(device),
        "setup": {
            "batch": args.batch,
            "seq": args.seq,
            "rounds": args.rounds,
            "dtype": dtype,
            "clock": args.clock,
            "shape": SHAPE,
            "transformers": transformers.__version__,
            "configs": args.configs,
        },
        "depths": [],
    }
    result["tag"] = ("cpu" if device == "cpu" else "cuda") + ("" if dtype == "fp32" else "_" + dtype)
    stem = args.out / f"{args.name}_{result['tag']}"
    args.out.mkdir(parents=True, exist_ok=True)
    for L in args.layers:
        result["depths"].append(run_depth(L, args, device, amp))
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")  # saved as it goes
    print(write(result, stem))


if __name__ == "__main__":
    main()
