"""Issue-2 benchmark: step time of memory-free backprop relative to stored activations, same model.

One interleaved run on the same machine: each round times one forward+backward of every configuration,
in rotating order, and the ratio of medians is reported (these machines are noisy, so only the ratio
measured inside one run is meaningful). The floor is 4/3: one extra block forward per layer on top of
forward + backward.

    python benchmarks/core_step_time.py                       # 12 layers, d=512, batch 8 x 256, CPU fp32
    python benchmarks/core_step_time.py --dynamics midpoint leapfrog hamiltonian --rounds 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import revllm

HERE = Path(__file__).resolve().parent


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def build(dynamics: str, memory_free: bool, args) -> revllm.RevLLMForCausalLM:
    cfg = revllm.RevLLMConfig(
        block=args.block,
        dynamics=dynamics,
        memory_free=memory_free,
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    return revllm.RevLLMForCausalLM(cfg).train()


def step(model, ids) -> float:
    t = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dynamics", nargs="+", default=["midpoint"])
    p.add_argument("--block", default="llama", choices=["llama", "gpt2"])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    configs = {}
    for dyn in args.dynamics:
        configs[f"{dyn} stored"] = build(dyn, False, args)
        configs[f"{dyn} memory-free"] = build(dyn, True, args)
    names = list(configs)
    for name in names:  # warm-up: allocator and thread pools
        step(configs[name], ids)
    times = {n: [] for n in names}
    for r in tqdm(range(args.rounds), desc="rounds"):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]  # rotate the order so no configuration always goes first
            times[name].append(step(configs[name], ids))

    rows = []
    for dyn in args.dynamics:
        s, m = statistics.median(times[f"{dyn} stored"]), statistics.median(times[f"{dyn} memory-free"])
        rows.append(dict(dynamics=dyn, stored_s=s, memory_free_s=m, ratio=m / s))
    result = dict(
        machine=machine(),
        torch=torch.__version__,
        block=args.block,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        vocab=args.vocab,
        batch=args.batch,
        seq=args.seq,
        rounds=args.rounds,
        precision="fp32",
        target_ratio=1.35,
        rows=rows,
        times=times,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "core_step_time.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Step time, memory-free vs stored, same model: {args.block}, {args.layers} layers, d={args.hidden}, "
        f"batch {args.batch} x {args.seq}, vocab {args.vocab}, fp32, {result['machine']}, torch {torch.__version__}, "
        f"median of {args.rounds} interleaved rounds.",
        "",
        "| dynamics | stored s/step | memory-free s/step | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "met" if r["ratio"] <= 1.35 else "missed"
        lines.append(
            f"| {r['dynamics']} | {r['stored_s']:.3f} | {r['memory_free_s']:.3f} | {r['ratio']:.3f}x | <= 1.35x ({ok}) |"
        )
    (args.out / "core_step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
