"""Train a small reversible LM on a token file with DDP or FSDP2, launched by torchrun.

    torchrun --nproc-per-node 2 examples/torchrun_train.py --tokens tokens.npy --parallel fsdp2 \
        --steps 100 --ckpt runs/fsdp2 --save-every 50
    # ...interrupted? the same command with --resume continues from the last checkpoint.

Tokens: a ``.npy`` array of token ids (loaded memory-mapped, never unpickled) or a raw ``.bin`` of
uint16 ids (nanoGPT's format). Each step every rank reads its own rows of a global batch chosen by a
seeded generator from the step number alone, so a resumed run sees exactly the batches the
uninterrupted run would have. Runs on CPU (gloo) and GPU (nccl) alike.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import revllm
from revllm.parallel import gradient_sync, init_distributed, load_sharded, parallelize, save_sharded

log = logging.getLogger("torchrun_train")


def load_tokens(path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        sys.exit(f"error: token file {p} does not exist")
    if p.suffix == ".npy":
        return np.load(p, mmap_mode="r", allow_pickle=False)
    return np.memmap(p, dtype=np.uint16, mode="r")


def global_batch(tokens: np.ndarray, step: int, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """The step's (rows, seq_len) batch, identical on every rank and on every resume."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=rows)
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--parallel", choices=["ddp", "fsdp2", "none"], default="ddp")
    ap.add_argument("--mp", choices=["bf16"], default=None, help="FSDP2 mixed precision: bf16 params, fp32 reduce")
    ap.add_argument("--block", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--dynamics", default="midpoint", choices=sorted(revllm.DYNAMICS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=None, help="default: largest token id + 1")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (rows per step, all ranks)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step on each rank")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", default=None, help="directory for sharded (DCP) checkpoints")
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    if args.batch_size % (world * args.grad_accum):
        sys.exit(
            f"error: --batch-size {args.batch_size} is not divisible by world size {world} x --grad-accum {args.grad_accum}"
        )
    if args.resume and not args.ckpt:
        sys.exit("error: --resume needs --ckpt")
    tokens = load_tokens(args.tokens)
    vocab = args.vocab or int(tokens.max()) + 1

    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    config = revllm.RevLLMConfig(
        block=args.block,
        dynamics=args.dynamics,
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=4 * args.hidden,
        vocab_size=vocab,
        max_position_embeddings=args.seq_len,
        loss_chunk_size=1024,
    )
    model = parallelize(revllm.RevLLMForCausalLM(config).to(device), args.parallel, mp_policy=args.mp)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    if args.resume:
        start = load_sharded(args.ckpt, model, opt)["step"]
        log.info("resumed from %s at step %d", args.ckpt, start)

    model.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0)
    for step in bar:
        rows = global_batch(tokens, step, args.batch_size, args.seq_len, args.seed).chunk(world)[rank].to(device)
        micro = rows.chunk(args.grad_accum)
        total = torch.zeros((), device=device)
        for i, ids in enumerate(micro):
            with gradient_sync(model, i == len(micro) - 1):  # reduce once, on the last micro-batch
                loss = model(ids, labels=ids).loss / len(micro)
                loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(total)
        bar.set_postfix(loss=f"{total.item() / world:.4f}")
        log.info("step %d loss %.6f", step + 1, total.item() / world)
        if args.ckpt and args.save_every and (step + 1) % args.save_every == 0:
            save_sharded(args.ckpt, model, opt, state={"step": step + 1, "args": vars(args)})
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
