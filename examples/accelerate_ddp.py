"""Train a small reversible LM with Hugging Face accelerate (DDP, or FSDP2 through its plugin).

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_ddp.py --tokens tokens.npy --steps 100
    # CPU only (gloo): the same command. accelerate's --multi_gpu is what starts N processes (torchrun);
    # on a machine without CUDA this script then joins them with gloo. `accelerate launch --cpu` always
    # starts ONE process, whatever --num_processes says ("NO on 1 process(es)").
    # FSDP2:             accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 \
    #                        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP examples/accelerate_ddp.py ...

``Accelerator.prepare`` wraps the model in DDP (or shards it with ``fully_shard`` per
``_no_split_modules`` layer for FSDP2) and ``Accelerator.accumulate`` skips the gradient all-reduce on
all but the last micro-batch. The memory-free backward needs nothing else, except that under FSDP2
``install_fsdp2_recompute_hooks`` must be called after ``prepare`` (see revllm/parallel/wrap.py).
Checkpoints are revllm's sharded DCP ones (atomic, checksummed, no arbitrary unpickling).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchrun_train import global_batch, load_tokens  # same data and sampler

import revllm
from revllm.parallel import install_fsdp2_recompute_hooks, load_sharded, save_sharded


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--dynamics", default="hamiltonian", choices=sorted(revllm.DYNAMICS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (rows per step, all ranks)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    # cpu=True without CUDA: accelerate then joins the torchrun-launched ranks with gloo (MULTI_CPU);
    # without it a CPU-only process stays DistributedType.NO even though a process group exists.
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available():
        # accelerate's FSDP plugin needs GPUs: with cpu=True it silently falls back to DDP (and on
        # torch 2.13 / accelerate 1.15 the run then hangs at exit). FSDP2 on CPU: torchrun_train.py.
        sys.exit("error: accelerate runs FSDP only on GPUs; on CPU use examples/torchrun_train.py --parallel fsdp2")
    acc = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    world, rank = acc.num_processes, acc.process_index
    if args.batch_size % (world * args.grad_accum):
        sys.exit(
            f"error: --batch-size {args.batch_size} is not divisible by {world} processes x --grad-accum {args.grad_accum}"
        )
    tokens = load_tokens(args.tokens)
    torch.manual_seed(args.seed)
    config = revllm.RevLLMConfig(
        block="llama",
        dynamics=args.dynamics,
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=4 * args.hidden,
        vocab_size=args.vocab or int(tokens.max()) + 1,
        max_position_embeddings=args.seq_len,
    )
    model = revllm.RevLLMForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, opt = acc.prepare(model, opt)
    hooked = install_fsdp2_recompute_hooks(model) if acc.distributed_type == DistributedType.FSDP else 0
    acc.print(f"{acc.distributed_type.value} on {world} process(es), {acc.device}; fsdp2-sharded layers: {hooked}")
    start = load_sharded(args.ckpt, model, opt)["step"] if args.resume else 0

    model.train()
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not acc.is_main_process):
        rows = global_batch(tokens, step, args.batch_size, args.seq_len, args.seed).chunk(world)[rank].to(acc.device)
        total = 0.0
        for ids in rows.chunk(args.grad_accum):
            with acc.accumulate(model):  # no_sync except on the last micro-batch
                loss = model(ids, labels=ids).loss
                acc.backward(loss)  # accelerate divides by gradient_accumulation_steps
                opt.step()  # a no-op until the last micro-batch (accelerate's AcceleratedOptimizer)
                opt.zero_grad()
            total += loss.detach() / args.grad_accum
        acc.print(f"step {step + 1} loss {acc.reduce(total, 'mean').item():.6f}")
        if args.ckpt and args.save_every and (step + 1) % args.save_every == 0:
            save_sharded(args.ckpt, model, opt, state={"step": step + 1})
    # The barrier before tearing down gloo: without it, a rank could free the DDP model (whose reducer holds
    # the last reference to the process group) while a gloo worker thread was still releasing the last
    # all-reduce's tensors; ~ProcessGroupGloo then joins that thread holding the GIL the thread waits for,
    # and the process hangs at exit (seen in 2 of 4 CPU runs). Then the group is destroyed, then the model.
    acc.wait_for_everyone()
    acc.end_training()  # destroys the process group
    del model, opt


if __name__ == "__main__":
    main()
