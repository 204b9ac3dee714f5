"""Per-rank body of the distributed tests; run as
``torchrun --nproc-per-node 2 tests/dist_worker.py {grads|train} OUT.json [CKPT_DIR]`` (gloo, CPU).

``grads``: for each case, every rank builds the same tiny model and the same global batch, computes the
single-process reference gradients on the whole batch, then the DDP / FSDP2 gradients on its half;
rank 0 writes the largest difference per case (FSDP2 shards are gathered with ``full_tensor``).
``train``: a short 2-process AdamW run that saves a DCP checkpoint at step 2 and keeps going; then a
freshly built (differently initialised) model and optimizer load the checkpoint and replay the rest.
Rank 0 writes both loss sequences and the largest parameter difference at the end. Then
``revllm.convert.finetune.finetune`` (the fine-tuning command's path) runs on 2 processes into
``CKPT_DIR/ft-{ddp,fsdp2}`` (``train ... TOKEN_DIR``); the test compares with one process, same global batch.
``deepspeed``: DeepSpeed ZeRO stages 1-3 (its own engine, ``DS_ACCELERATOR=cpu``, gloo) against one process.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_model

from revllm.parallel import gradient_sync, init_distributed, load_sharded, parallelize, save_sharded

B, T, V = 4, 12, 97


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _reference(kw, ids):
    model = tiny_model(**kw)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _parallel_grads(kw, ids, mode, rank, world, micro=1, mp=None):
    model = parallelize(tiny_model(**kw), mode, mp_policy=mp)
    local = ids.chunk(world)[rank]
    chunks = local.chunk(micro)
    for i, c in enumerate(chunks):
        with gradient_sync(model, i == len(chunks) - 1):  # accumulate, reduce on the last micro-batch
            (model(c, labels=c).loss / micro).backward()
    inner = model.module if mode == "ddp" else model
    return {n: _full(p.grad).float() for n, p in inner.named_parameters()}


def grads(rank, world, out):
    torch.manual_seed(123)
    ids = torch.randint(0, V, (B, T))
    cases = {
        "ddp-llama-midpoint": (dict(block="llama", dynamics="midpoint"), "ddp", {}),
        "ddp-llama-hamiltonian": (dict(block="llama", dynamics="hamiltonian"), "ddp", {}),
        "ddp-gpt2-midpoint": (dict(block="gpt2", dynamics="midpoint"), "ddp", {}),
        "ddp-llama-midpoint_a-fixed_point": (
            dict(block="llama", dynamics="midpoint_a", initial_state="fixed_point"),
            "ddp",
            {},
        ),
        "ddp-llama-midpoint-no_sync": (dict(block="llama", dynamics="midpoint"), "ddp", dict(micro=2)),
        "fsdp2-llama-midpoint": (dict(block="llama", dynamics="midpoint", layers=3), "fsdp2", {}),
        "fsdp2-llama-hamiltonian": (dict(block="llama", dynamics="hamiltonian", layers=3), "fsdp2", {}),
        "fsdp2-gpt2-hamiltonian": (dict(block="gpt2", dynamics="hamiltonian"), "fsdp2", {}),
        "fsdp2-gpt2-leapfrog": (dict(block="gpt2", dynamics="leapfrog"), "fsdp2", {}),
        "fsdp2-llama-midpoint-no_sync": (dict(block="llama", dynamics="midpoint"), "fsdp2", dict(micro=2)),
        "fsdp2-llama-hamiltonian-bf16": (dict(block="llama", dynamics="hamiltonian"), "fsdp2", dict(mp="bf16")),
    }
    results = {}
    for name, (kw, mode, extra) in cases.items():
        ref = _reference(kw, ids)
        got = _parallel_grads(kw, ids, mode, rank, world, **extra)
        assert got.keys() == ref.keys(), (name, sorted(set(got) ^ set(ref)))
        results[name] = {
            "max_abs": max((got[n] - ref[n]).abs().max().item() for n in ref),
            "max_rel": max(((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref),
            "params": len(ref),
        }
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))


def _train(model, opt, ids, steps, rank, world):
    losses = []
    for s in steps:
        batch = ids[s].chunk(world)[rank]  # deterministic sampler: step s, this rank's rows
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(_mean(loss.detach()))
    return losses


def _mean(t):
    t = t.clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _params(model):
    inner = getattr(model, "module", model)
    return {n: _full(p.detach()).clone() for n, p in inner.named_parameters()}


FINETUNE = dict(
    max_steps=3,
    batch_size=2,
    seq_len=32,
    lr=1e-3,
    warmup=1,
    eval_interval=3,
    eval_iters=1,
    checkpoint_interval=3,
    log_interval=1,
    progress=False,
)


def finetune_model():
    return tiny_model(seed=3, vocab_size=300, dynamics="hamiltonian")


def train(rank, world, out, ckpt_root, token_dir):
    torch.manual_seed(7)
    ids = torch.randint(0, V, (5, B, T))  # 5 steps of global batch B
    results = {}
    for mode in ("ddp", "fsdp2"):
        kw = dict(block="llama", dynamics="hamiltonian", layers=2)
        ckpt = Path(ckpt_root) / mode
        model = parallelize(tiny_model(seed=1, **kw), mode)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        first = _train(model, opt, ids, range(2), rank, world)
        save_sharded(ckpt, model, opt, state={"step": 2})
        rest = _train(model, opt, ids, range(2, 5), rank, world)
        end = _params(model)
        # Resume: a different initialisation and a fresh optimizer, overwritten by the checkpoint.
        model2 = parallelize(tiny_model(seed=99, **kw), mode)
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
        state = load_sharded(ckpt, model2, opt2)
        resumed = _train(model2, opt2, ids, range(state["step"], 5), rank, world)
        end2 = _params(model2)
        results[mode] = {
            "first": first,
            "rest": rest,
            "resumed": resumed,
            "step": state["step"],
            "param_max_abs": max((end[n] - end2[n]).abs().max().item() for n in end),
        }
    from revllm.convert.finetune import finetune

    for mode in ("ddp", "fsdp2"):  # the fine-tuning command's path: the shared loop, then rank 0 saves RUN/model
        finetune(finetune_model(), token_dir, Path(ckpt_root) / f"ft-{mode}", parallel=mode, **FINETUNE)
    # The conversion default: fixed_point evaluates layer 0 twice (DDP needs a static graph), distilled
    # through LoRA with the hidden-state term (the loss finds the norm inside DDP(PeftModel(...))).
    from revllm.convert.distill import DistillLoss

    for lora in (0, 2):
        student = tiny_model(seed=3, vocab_size=300, block="gpt2", dynamics="midpoint", initial_state="fixed_point")
        teacher = tiny_model(seed=4, vocab_size=300, block="gpt2", dynamics="euler")
        finetune(
            student,
            token_dir,
            Path(ckpt_root) / f"ft-ddp-fixed_point-lora{lora}",
            parallel="ddp",
            lora=lora,
            loss_fn=DistillLoss(teacher, hidden_weight=1.0),
            **FINETUNE,
        )
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))


def deepspeed_grads(rank, world, out):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(123)
    ids = torch.randint(0, V, (B, T))
    results = {}
    for stage in (1, 2, 3):
        for dyn in ("midpoint", "hamiltonian"):
            kw = dict(block="llama", dynamics=dyn)
            ref = _reference(kw, ids)
            model = tiny_model(**kw)
            cfg = {
                "train_micro_batch_size_per_gpu": B // world,
                "gradient_accumulation_steps": 1,
                "zero_allow_untested_optimizer": True,
                "zero_optimization": {"stage": stage},
            }
            eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
            local = ids.chunk(world)[rank]
            eng.backward(eng(local, labels=local).loss)
            got = {n: safe_get_full_grad(p) for n, p in eng.module.named_parameters()}  # collective under ZeRO-3
            results[f"zero{stage}-{dyn}"] = {
                "missing": [n for n, g in got.items() if g is None],
                "max_abs": max((got[n].float() - ref[n]).abs().max().item() for n in ref if got[n] is not None),
            }
            eng.destroy()
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks on a small CPU
    rank, world, _ = init_distributed("gloo")
    {"grads": grads, "train": train, "deepspeed": deepspeed_grads}[sys.argv[1]](rank, world, *sys.argv[2:])
    # Both ranks leave together: a rank tearing down its gloo group while the other still talks to it
    # can abort in a C++ destructor ("terminate called without an active exception", seen once with DeepSpeed).
    dist.barrier()
    dist.destroy_process_group()
