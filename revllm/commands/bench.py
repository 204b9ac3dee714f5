"""``revllm bench memory|speed|capacity|report``: the benchmark tables (see revllm/bench).

Each table command writes ``<out>/<table>_<machine>.json`` (the record), ``.md`` and (memory,
capacity) ``.png``; ``report`` re-renders them all from the JSON and prints the Markdown.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..bench.allocator import allocator_table
from ..bench.capacity import capacity_table
from ..bench.configs import Spec, machine_tag, parse_bytes, parse_configs, parse_ints, resolve_device
from ..bench.finetune import CONFIGS, MODES, finetune_table, load_resume, max_positions, parse_names, plan
from ..bench.memory import memory_table
from ..bench.report import SHAPE_KEYS, load, merge, rebuild, render_markdown, save, stem_of
from ..bench.speed import speed_table
from ..blocks import FAMILIES
from ..errors import RevLLMError

DEFAULT_OUT = "benchmarks/results"


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="memory / step time / max batch against ordinary training and checkpointing"
    )
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="TABLE")
    _add_model_tables(sub)
    _add_finetune_and_results(sub)


def _model_args(
    q, layers_help, depths=None, configs="euler,euler_ckpt,midpoint,leapfrog,midpoint_a,hamiltonian,midpoint_stored"
):
    """The model shape and output options every table shares."""
    q.add_argument(
        "--configs",
        default=configs,
        help="comma list: euler (a), euler_ckpt (b), <reversible> (c, memory-free), <reversible>_stored (d)",
    )
    if depths is not None:
        q.add_argument("--depths", default=depths, help=layers_help)
    else:
        q.add_argument("--layers", type=int, default=12, help=layers_help)
    q.add_argument("--d", type=int, default=512, help="model width")
    q.add_argument("--heads", type=int, default=8)
    q.add_argument("--seq", type=int, default=256, help="sequence length")
    q.add_argument("--vocab", type=int, default=8192)
    q.add_argument("--block", default="gpt2", choices=sorted(FAMILIES))
    q.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk of the LM-head loss")
    q.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    q.add_argument("--dtype", default="auto", help="fp32 or bf16 (autocast); auto = bf16 on cuda, fp32 on cpu")
    q.add_argument("--compile", action="store_true", help="torch.compile each block's function f (opt-in)")
    q.add_argument("--out", default=DEFAULT_OUT, help="results directory")
    q.add_argument("--name", default=None, help="file stem instead of the table name (e.g. speed-sweep)")


def _add_model_tables(sub):
    """memory, speed, capacity and allocator: tables of one model shape in configurations (a)-(d)."""
    m = sub.add_parser("memory", help="table 1: saved bytes and peak memory vs depth (fresh process per row)")
    _model_args(m, "comma list of depths", depths="6,12,24,48,96")
    m.add_argument("--batch", type=int, default=8)
    m.add_argument("--memory-budget", default=None, help="e.g. 4GiB: rows predicted or found over it are skipped")
    m.add_argument("--max-seconds", type=float, default=None, help="per-row wall limit; slower rows are skipped")
    m.set_defaults(func=run_memory)

    s = sub.add_parser("speed", help="table 2: step time at the same batch, ratio to (a), interleaved")
    _model_args(s, "depth")
    s.add_argument("--batch", default="8", help="batch, or a comma list for a tokens/s-vs-batch sweep")
    s.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median reported)")
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--profile", action="store_true", help="also profile one step per row (top operators)")
    s.set_defaults(func=run_speed)

    c = sub.add_parser("capacity", help="table 3: max batch under a memory budget, tokens/s at that batch")
    _model_args(c, "comma list of depths", depths="16,32,64,96", configs="euler,euler_ckpt,midpoint")
    c.add_argument("--memory-budget", default=None, help="required on CPU (e.g. 4GiB); on CUDA default = the card")
    c.add_argument("--start-batch", type=int, default=1)
    c.add_argument("--max-batch", type=int, default=1 << 16, help="stop doubling here (reported as capped)")
    c.add_argument("--tolerance", type=float, default=0.0, help="stop bisecting within this fraction (0 = exact)")
    c.add_argument("--steps", type=int, default=3, help="timed steps at the max batch")
    c.add_argument("--warmup", type=int, default=1)
    c.add_argument("--resume", default=None, help="result JSON of an interrupted run: reuse its finished searches")
    c.set_defaults(func=run_capacity)

    a = sub.add_parser("allocator", help="whole-process peak of training vs depth per allocator setting, interleaved")
    _model_args(a, "comma list of depths", depths="4,32", configs="midpoint,midpoint_stored")
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--steps", type=int, default=4, help="AdamW steps per row, from cold")
    a.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each row")
    a.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also measure this allocator via LD_PRELOAD (e.g. jemalloc=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)",
    )
    a.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VAR=VALUE[,VAR=VALUE]",
        help="also measure glibc malloc under these environment tunables "
        "(e.g. mmap1m=MALLOC_MMAP_THRESHOLD_=1048576,MALLOC_TRIM_THRESHOLD_=33554432)",
    )
    a.set_defaults(func=run_allocator, d=128, seq=512, heads=4)


def _add_finetune_and_results(sub):
    """finetune (SmolLM2-135M), and report / merge of saved results."""
    f = sub.add_parser("finetune", help="fine-tuning SmolLM2-135M: peak memory, s/step, tokens/s vs sequence and batch")
    f.add_argument(
        "--configs",
        default="hf,hf_ckpt,euler,euler_ckpt,near_euler_k4,leapfrog",
        help="comma list of hf, hf_ckpt, euler, euler_ckpt, near_euler_k4, leapfrog",
    )
    f.add_argument("--modes", default="full,lora", help="comma list of full, lora (r=8)")
    f.add_argument("--seqs", default="512,1024,2048,4096,8192", help="sequence lengths at batch 1")
    f.add_argument("--batches", default="1,2,4,8", help="batch sweep at 1,024 tokens")
    f.add_argument("--steps", type=int, default=1, help="timed steps per row (after one short warm-up step)")
    f.add_argument("--budgets", default="4GiB,8GiB", help="budgets for the what-fits summary (by measured peak)")
    f.add_argument(
        "--memory-limit",
        default=None,
        help="hard cap per row (RLIMIT_AS): a row over it fails as oom instead of swapping",
    )
    f.add_argument("--max-seconds", type=float, default=None, help="per-row wall limit")
    f.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each row (default: as set)")
    f.add_argument("--out", default=DEFAULT_OUT, help="results directory")
    f.add_argument("--name", default=None, help="file stem instead of 'finetune'")
    f.add_argument(
        "--fresh", action="store_true", help="measure every row again (default: resume, skipping finished rows)"
    )
    f.set_defaults(func=run_finetune)

    r = sub.add_parser("report", help="re-render every result's Markdown/PNG from its JSON and print the tables")
    r.add_argument("--results", default=DEFAULT_OUT, help="results directory")
    r.set_defaults(func=run_report)

    g = sub.add_parser("merge", help="unite runs of one table (e.g. configurations run in parallel) into one result")
    g.add_argument("inputs", nargs="+", help="result JSON files of the same table, machine and model shape")
    g.add_argument("--out", default=DEFAULT_OUT, help="results directory for <table>_<machine>.{json,md,png}")
    g.set_defaults(func=run_merge)


def _base(args, batch: int = 8):
    device, dtype = resolve_device(args.device, args.dtype)
    for name in ("d", "heads", "seq", "vocab", "loss_chunk"):
        if getattr(args, name) < 1:
            raise RevLLMError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.d % args.heads:
        raise RevLLMError(f"--heads {args.heads} must divide --d {args.d}")
    if args.name and not all(ch.isalnum() or ch in "-." for ch in args.name):
        raise RevLLMError(f"--name {args.name!r} may only hold letters, digits, '-' and '.'")
    configs = parse_configs(args.configs)
    spec = Spec(
        d=args.d,
        heads=args.heads,
        seq=args.seq,
        vocab=args.vocab,
        block=args.block,
        batch=batch,
        loss_chunk=args.loss_chunk,
        device=device,
        dtype=dtype,
        compile=args.compile,
        layers=getattr(args, "layers", 1),
    )
    return configs, spec


def _command(args) -> str:
    """The equivalent full command line, every option spelled out (recorded with the results)."""
    skip = {"command", "bench_command", "func"}
    parts = ["revllm", "bench", args.bench_command]
    for k, v in vars(args).items():
        if k in skip or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, list):  # a repeatable option
            parts += [x for item in v for x in (flag, str(item))]
            continue
        parts += [flag] if v is True else [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def _saver(args):
    """Save the partial table after every row: a long CPU run interrupted late keeps what it measured."""

    def on_row(partial):
        if args.name:
            partial["name"] = args.name
        save({**partial, "partial": True}, args.out)

    return on_row


def _finish(result, args):
    if args.name:
        result["name"] = args.name
    paths = save(result, args.out)
    print(render_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))


def run_memory(args):
    if args.batch < 1:
        raise RevLLMError(f"--batch must be a positive integer, got {args.batch}")
    configs, spec = _base(args, args.batch)
    depths = parse_ints(args.depths, "--depths")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise RevLLMError(f"--max-seconds must be positive, got {args.max_seconds:g}")
    result = memory_table(
        configs,
        depths,
        spec,
        budget=parse_bytes(args.memory_budget),
        max_seconds=args.max_seconds,
        command=_command(args),
        on_row=_saver(args),
    )
    _finish(result, args)


def run_speed(args):
    batches = parse_ints(args.batch, "--batch")
    if args.layers < 1 or args.repeats < 1 or args.warmup < 0:
        raise RevLLMError("--layers and --repeats must be positive and --warmup non-negative")
    configs, spec = _base(args, batches[0])
    result = speed_table(
        configs, batches, spec, repeats=args.repeats, warmup=args.warmup, command=_command(args), profile=args.profile
    )
    _finish(result, args)


def run_capacity(args):
    configs, spec = _base(args)
    depths = parse_ints(args.depths, "--depths")
    budget = parse_bytes(args.memory_budget)
    if budget is None and spec.device == "cpu":
        raise RevLLMError("--memory-budget is required on CPU (e.g. --memory-budget 4GiB)")
    if args.start_batch < 1 or args.max_batch < args.start_batch or not 0 <= args.tolerance < 1:
        raise RevLLMError("need 1 <= --start-batch <= --max-batch and 0 <= --tolerance < 1")
    if args.steps < 1 or args.warmup < 0:
        raise RevLLMError("--steps must be positive and --warmup non-negative")
    resume_rows = []
    if args.resume:
        prev = load(args.resume)
        if prev["table"] != "capacity":
            raise RevLLMError(f"--resume {args.resume} is a {prev['table']} table, not capacity")
        # Reuse rows only from the same model shape, machine and budget.
        now = spec.to_dict()
        diff = [k for k in SHAPE_KEYS if k != "batch" and k in now and prev["setup"].get(k) != now[k]]
        diff += ["machine"] if prev.get("machine_tag") != machine_tag(spec.device) else []
        diff += ["--memory-budget"] if prev["setup"].get("budget_bytes") != budget else []
        if diff:
            raise RevLLMError(f"--resume {args.resume} was measured with another {', '.join(diff)}: start a new table")
        resume_rows = prev["rows"]
    result = capacity_table(
        configs,
        depths,
        spec,
        budget=budget,
        resume_rows=resume_rows,
        start=args.start_batch,
        cap=args.max_batch,
        tolerance=args.tolerance,
        steps=args.steps,
        warmup=args.warmup,
        command=_command(args),
        on_row=_saver(args),
    )
    _finish(result, args)


def _malloc_settings(items, taken) -> dict:
    """``--setting NAME=VAR=VALUE[,VAR=VALUE]`` -> {name: {VAR: VALUE}}; only glibc's MALLOC_* tunables."""
    out = {}
    for item in items:
        name, _, rest = item.partition("=")
        pairs = [p.partition("=") for p in rest.split(",") if p]
        if not name or not pairs or any(not sep or not k.startswith("MALLOC_") or not v for k, sep, v in pairs):
            raise RevLLMError(f"--setting {item!r}: give NAME=MALLOC_VAR=VALUE[,MALLOC_VAR=VALUE]")
        if name in taken or name in out:
            raise RevLLMError(f"--setting {item!r}: the name {name!r} is already used")
        out[name] = {k: v for k, _, v in pairs}
    return out


def run_allocator(args):
    if args.batch < 1 or args.steps < 1 or (args.threads is not None and args.threads < 1):
        raise RevLLMError("--batch, --steps and --threads must be positive")
    preloads = {}
    for item in args.preload:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise RevLLMError(f"--preload {item!r}: give NAME=PATH of an existing shared library")
        preloads[name] = path
    configs, spec = _base(args, args.batch)
    result = allocator_table(
        configs,
        parse_ints(args.depths, "--depths"),
        spec,
        args.steps,
        preloads,
        settings=_malloc_settings(args.setting, taken={"system", "revllm", *preloads}),
        threads=args.threads,
        command=_command(args),
        on_row=_saver(args),
    )
    _finish(result, args)


def run_finetune(args):
    configs = parse_names(args.configs, CONFIGS, "configuration")
    modes = parse_names(args.modes, MODES, "mode")
    seqs, batches = parse_ints(args.seqs, "--seqs"), parse_ints(args.batches, "--batches")
    budgets = [parse_bytes(b) for b in args.budgets.split(",") if b.strip()]
    limit = parse_bytes(args.memory_limit)
    if args.steps < 1 or (args.threads is not None and args.threads < 1):
        raise RevLLMError("--steps and --threads must be positive")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise RevLLMError(f"--max-seconds must be positive, got {args.max_seconds:g}")
    if args.name and not all(ch.isalnum() or ch in "-." for ch in args.name):
        raise RevLLMError(f"--name {args.name!r} may only hold letters, digits, '-' and '.'")
    longest = max(seqs + [1024] if len(batches) > 1 or batches != [1] else seqs)
    positions = max_positions()  # from the GGUF's metadata, before any weights are loaded
    if longest > positions:
        raise RevLLMError(f"sequence length {longest} exceeds SmolLM2's {positions} positions")
    target = Path(args.out) / f"{args.name or 'finetune'}_{machine_tag('cpu')}.json"
    resume_rows = [] if args.fresh else load_resume(target)
    result = finetune_table(
        plan(configs, modes, seqs, batches),
        steps=args.steps,
        budgets=budgets,
        limit=limit,
        max_seconds=args.max_seconds,
        threads=args.threads,
        resume_rows=resume_rows,
        command=_command(args),
        on_row=_saver(args),
    )
    _finish(result, args)


def run_report(args):
    written = rebuild(args.results)
    for p in written:
        if p.suffix == ".md":
            print(p.read_text())
    print("wrote " + ", ".join(str(p) for p in written))


def run_merge(args):
    result = merge([load(p) for p in args.inputs])
    target = Path(args.out) / f"{stem_of(result)}.json"
    if target.exists() and not any(target.resolve() == Path(p).resolve() for p in args.inputs):
        raise RevLLMError(f"{target} exists and is not one of the inputs: merge into another --out")
    paths = save(result, args.out)
    print(render_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
