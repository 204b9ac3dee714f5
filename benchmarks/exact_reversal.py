"""Issue-4 benchmark: exact (int64 fixed-point) streams against float streams in the memory-free backward.

Three measurements, one run, one machine:
  1. gradient cosine similarity to the true gradient (stored activations, same precision) at 30 layers
     under bf16 autocast with sharpened random weights (every matrix x4, standing in for trained
     weights until converted SmolLM2 weights exist), float vs exact streams, for each reversible
     dynamics; exact mode is also compared with its own stored reference (bit-equality expected);
  2. step-time cost of exact mode: memory-free forward+backward, exact vs float, interleaved rounds in
     rotating order, ratio of medians (fp32 and bf16 autocast);
  3. memory held between forward and backward against depth, low-bit buffer counted: stored
     activations, float memory-free, exact memory-free.

    python benchmarks/exact_reversal.py                  # defaults below, CPU
    python benchmarks/exact_reversal.py --rounds 9 --time-hidden 512
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import revllm
from revllm.memory import SavedBytes

HERE = Path(__file__).resolve().parent
# midpoint_a: the paper's random a_j quantized to 1/16 (|a| in [1/2, 3/2]), and the near-Euler a = 1/16.
DYNAMICS = {
    "midpoint": {},
    "leapfrog": {},
    "hamiltonian": {},
    "midpoint_a (random, 4-bit)": dict(dynamics="midpoint_a", midpoint_a_dyadic_bits=4),
    "midpoint_a (a=1/16)": dict(dynamics="midpoint_a", midpoint_a=1 / 16, midpoint_a_floor=0.0),
}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def build(name, layers, hidden, vocab, seq, block="llama", sharpen=1.0, seed=0, **kw):
    cfg = dict(
        dynamics=name,
        block=block,
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=max(1, hidden // 32),
        vocab_size=vocab,
        max_position_embeddings=seq,
    )
    cfg.update(DYNAMICS[name])
    cfg.update(kw)
    torch.manual_seed(seed)
    model = revllm.RevLLMForCausalLM(revllm.RevLLMConfig(**cfg)).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(sharpen)
    return model


def grad(model, ids, memory_free, exact, bf16=True):
    model.config.update(dict(memory_free=memory_free, exact_reversal=exact))
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def cosine_rows(args):
    rows = []
    for name in tqdm(DYNAMICS, desc="cosine"):
        for block in ("llama", "gpt2"):
            for seed in range(args.seeds):
                model = build(name, args.layers, args.hidden, args.vocab, args.seq, block, args.sharpen, seed)
                ids = torch.randint(
                    0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(seed)
                )
                true_f = grad(model, ids, False, False)  # stored activations, float streams
                mf_f = grad(model, ids, True, False)
                true_e = grad(model, ids, False, True)  # stored activations, exact streams
                mf_e = grad(model, ids, True, True)
                cos = lambda a, b: F.cosine_similarity(a, b, dim=0).item()  # noqa: E731
                rows.append(
                    dict(
                        dynamics=name,
                        block=block,
                        seed=seed,
                        cos_float=cos(mf_f, true_f),
                        cos_exact=cos(mf_e, true_e),
                        exact_bitwise=bool(torch.equal(mf_e, true_e)),
                        cos_exact_vs_float_true=cos(mf_e, true_f),
                    )
                )
    return rows


def time_rows(args):
    ids = torch.randint(0, args.vocab, (args.time_batch, args.time_seq), generator=torch.Generator().manual_seed(0))
    cases = [(name, prec) for name in DYNAMICS for prec in ("fp32", "bf16")]
    models = {name: build(name, args.time_layers, args.time_hidden, args.vocab, args.time_seq) for name in DYNAMICS}
    jobs = [(name, prec, exact) for name, prec in cases for exact in (False, True)]

    def step(job):
        name, prec, exact = job
        t = time.perf_counter()
        grad(models[name], ids, True, exact, bf16=prec == "bf16")
        return time.perf_counter() - t

    for job in jobs:  # warm-up
        step(job)
    times = {job: [] for job in jobs}
    for r in tqdm(range(args.rounds), desc="step time"):
        for i in range(len(jobs)):
            job = jobs[(i + r) % len(jobs)]
            times[job].append(step(job))
    rows = []
    for name, prec in cases:
        tf, te = times[name, prec, False], times[name, prec, True]
        f, e = statistics.median(tf), statistics.median(te)
        # min over rounds is the least disturbed by other processes on a shared machine
        rows.append(
            dict(
                dynamics=name,
                precision=prec,
                float_s=f,
                exact_s=e,
                overhead=e / f - 1,
                overhead_min=min(te) / min(tf) - 1,
                float_times=tf,
                exact_times=te,
            )
        )
    return rows


def arith_rows(args, reps=30):
    """Per substep, the stream arithmetic alone (no block): float step+inverse vs exact step+inverse
    (with decode), against one block forward+backward; min over ``reps`` (robust to machine load)."""
    rows = []
    for name in DYNAMICS:
        model = build(name, args.time_layers, args.time_hidden, args.vocab, args.time_seq, exact_reversal=True)
        dyn, blk, part, bits = model.dynamics, model.model.layers[0], model.dynamics.parts[0], 32
        shape = (args.time_batch, args.time_seq, args.time_hidden)
        x, y = torch.randn(shape), torch.randn(shape)
        kw = model.model.embed(torch.zeros(shape[:2], dtype=torch.long), torch.arange(shape[1]).expand(shape[:2]))[1]
        fy = blk(y, part=part, **kw).detach()
        X, Y = torch.round(x * 2.0**bits).long(), torch.round(y * 2.0**bits).long()

        def best(fn):
            out = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return min(out)

        def flt():
            dyn.inverse(0, y, dyn.step(0, x, y, fy), fy)

        def exact():
            yf = Y.to(torch.float32) * 2.0**-bits  # decode, done in forward and backward
            Z, low = dyn.step_exact(0, X, Y, fy, bits)
            torch.aminmax(Z)
            yf = Y.to(torch.float32) * 2.0**-bits  # noqa: F841  (the decode is part of what is timed)
            dyn.inverse_exact(0, Y, Z, fy, low, bits)

        def block():
            yi = y.detach().requires_grad_(True)
            blk(yi, part=part, **kw).sum().backward()

        f, e, b = best(flt), best(exact), best(block)
        rows.append(
            dict(
                dynamics=name,
                float_arith_s=f,
                exact_arith_s=e,
                block_fwd_bwd_s=b,
                extra_fraction_of_step=(e - f) / (2 * b + f),
            )
        )  # step ~ fwd + (fwd+bwd) per substep
    return rows


def held_bytes(model, ids):
    """Bytes the stack keeps between forward and backward: saved tensors (not parameters) + the buffer."""
    with SavedBytes(model) as meter:
        loss = model(ids, labels=ids).loss
    # The low-bit buffer is a ctx attribute, outside saved tensors: walk the graph for the engine's node.
    stack, seen, buf = [loss.grad_fn], set(), 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        buf += sum(s.numel() * s.element_size() for s in getattr(node, "sides", None) or [] if s is not None)
        stack.extend(n for n, _ in node.next_functions)
    loss.backward()
    return meter.bytes + buf, buf


def memory_rows(args):
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for layers in tqdm(args.depths, desc="memory"):
        for label, kw in [
            ("stored", dict(memory_free=False)),
            ("memory-free float", dict(memory_free=True)),
            ("memory-free exact", dict(memory_free=True, exact_reversal=True)),
        ]:
            model = build("midpoint_a (random, 4-bit)", layers, args.hidden, args.vocab, args.seq, **kw)
            total, buf = held_bytes(model, ids)
            rows.append(
                dict(
                    mode=label,
                    layers=layers,
                    bytes=total,
                    buffer_bytes=buf,
                    elements=args.batch * args.seq * args.hidden,
                )
            )
    return rows


def write(result, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "exact_reversal.json").write_text(json.dumps(result, indent=2))
    a = result["args"]
    L = [
        f"Exact vs float streams, memory-free backward. {result['machine']}, torch {result['torch']}.",
        "",
        f"### Gradient cosine to the stored-activation gradient ({a['layers']} layers, d={a['hidden']}, "
        f"batch {a['batch']} x {a['seq']}, bf16 autocast, every matrix x{a['sharpen']}, "
        f"mean (min) over {a['seeds']} seeds)",
        "",
        "| dynamics | block | float streams | exact streams | exact bit-equal to stored | exact vs float-stored |",
        "|---|---|---|---|---|---|",
    ]
    groups = {}
    for r in result["cosine"]:
        groups.setdefault((r["dynamics"], r["block"]), []).append(r)
    for (name, block), rs in groups.items():
        f = [r["cos_float"] for r in rs]
        e = [r["cos_exact"] for r in rs]
        x = [r["cos_exact_vs_float_true"] for r in rs]
        L.append(
            f"| {name} | {block} | {statistics.mean(f):.4f} ({min(f):.4f}) | {statistics.mean(e):.4f} ({min(e):.4f}) "
            f"| {sum(r['exact_bitwise'] for r in rs)}/{len(rs)} | {statistics.mean(x):.4f} |"
        )
    L += [
        "",
        f"### Step time, exact vs float streams (llama, {a['time_layers']} layers, d={a['time_hidden']}, "
        f"batch {a['time_batch']} x {a['time_seq']}, memory-free forward+backward, median of {a['rounds']} "
        "interleaved rounds)",
        "",
        "| dynamics | precision | float s/step | exact s/step | overhead (medians) | overhead (minima) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["time"]:
        L.append(
            f"| {r['dynamics']} | {r['precision']} | {r['float_s']:.4f} | {r['exact_s']:.4f} | {100 * r['overhead']:+.1f}% "
            f"| {100 * r['overhead_min']:+.1f}% |"
        )
    L += [
        "",
        "### Stream arithmetic alone, per substep (same size, fp32, min of 30 repeats)",
        "",
        "| dynamics | float step+inverse | exact step+inverse | block fwd+bwd | exact extra / step (est.) |",
        "|---|---|---|---|---|",
    ]
    for r in result["arith"]:
        L.append(
            f"| {r['dynamics']} | {1e3 * r['float_arith_s']:.3f} ms | {1e3 * r['exact_arith_s']:.3f} ms "
            f"| {1e3 * r['block_fwd_bwd_s']:.3f} ms | {100 * r['extra_fraction_of_step']:+.1f}% |"
        )
    L += [
        "",
        f"### Memory held between forward and backward (midpoint_a random 4-bit, d={a['hidden']}, "
        f"batch {a['batch']} x {a['seq']}; saved tensors + low-bit buffer, parameters excluded)",
        "",
        "| layers | stored | memory-free float | memory-free exact | of which k-bit buffer |",
        "|---|---|---|---|---|",
    ]
    by = {(r["mode"], r["layers"]): r for r in result["memory"]}
    for layers in a["depths"]:
        s, f, e = (by[m, layers] for m in ("stored", "memory-free float", "memory-free exact"))
        L.append(
            f"| {layers} | {s['bytes'] / 2**20:.2f} MiB | {f['bytes'] / 2**20:.2f} MiB | {e['bytes'] / 2**20:.2f} MiB "
            f"| {e['buffer_bytes'] / 2**10:.1f} KiB ({8 * e['buffer_bytes'] / e['elements'] / layers:.2f} bits/element/layer) |"
        )
    (out / "exact_reversal.md").write_text("\n".join(L) + "\n")
    plot(result, out / "exact_reversal.png")
    return "\n".join(L)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(dict.fromkeys(r["dynamics"] for r in result["cosine"]))
    xs = range(len(names))
    for off, key, label in [(-0.2, "cos_float", "float streams"), (0.2, "cos_exact", "exact streams")]:
        vals = [statistics.mean(r[key] for r in result["cosine"] if r["dynamics"] == n) for n in names]
        bars = ax[0].bar([x + off for x in xs], [0.0 if v != v else v for v in vals], 0.4, label=label)
        for bar, v in zip(bars, vals):
            if v != v:  # NaN: the float reconstruction overflowed
                ax[0].annotate("NaN", (bar.get_x() + bar.get_width() / 2, 0.02), ha="center", fontsize=8)
    ax[0].set_xticks(list(xs), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax[0].set_ylabel("cosine to stored gradient")
    ax[0].set_title(f"{result['args']['layers']} layers, bf16, sharpened weights")
    ax[0].legend()
    # End-to-end medians on a loaded machine are noise-bound; the arithmetic-only estimate is robust.
    ax[1].bar(
        list(xs),
        [100 * next(r["extra_fraction_of_step"] for r in result["arith"] if r["dynamics"] == n) for n in names],
        0.6,
        label="stream arithmetic (min of repeats)",
    )
    ax[1].axhline(5, color="k", ls="--", lw=0.8, label="5% bar")
    ax[1].set_xticks(list(xs), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax[1].set_ylabel("exact extra time per step (%, est.)")
    ax[1].legend()
    for mode in ("stored", "memory-free float", "memory-free exact"):
        rs = [r for r in result["memory"] if r["mode"] == mode]
        ax[2].plot([r["layers"] for r in rs], [r["bytes"] / 2**20 for r in rs], "o-", label=mode)
    ax[2].set_xlabel("layers")
    ax[2].set_ylabel("MiB held for the backward")
    ax[2].legend()
    fig.suptitle(result["machine"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--sharpen", type=float, default=4.0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--time-layers", type=int, default=8)
    p.add_argument("--time-hidden", type=int, default=128)
    p.add_argument("--time-batch", type=int, default=2)
    p.add_argument("--time-seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument(
        "--sections",
        nargs="*",
        default=["cosine", "time", "arith", "memory"],
        help="sections to (re)measure; the others are kept from an existing results JSON",
    )
    args = p.parse_args()
    old = args.out / "exact_reversal.json"
    result = json.loads(old.read_text()) if old.exists() and len(args.sections) < 4 else {}
    result.update(machine=machine(), torch=torch.__version__)
    result["args"] = {
        **result.get("args", {}),
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    for name, fn in [("cosine", cosine_rows), ("time", time_rows), ("arith", arith_rows), ("memory", memory_rows)]:
        if name in args.sections:
            result[name] = fn(args)
    print(write(result, args.out))


if __name__ == "__main__":
    main()
