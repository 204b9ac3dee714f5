"""``revllm eval MODEL``: validation loss / perplexity on a token dir or text, and lm-eval tasks.

MODEL is a run directory, a checkpoint, an HF model directory (revllm or not), a .gguf file or
``smollm2``. ``--data DIR`` scores DIR/val.bin; ``--text FILE`` tokenizes FILE with the model's
tokenizer; ``--tasks a,b`` runs zero-shot tasks through lm-eval's HFLM (built-in: revllm_commonsense;
standard tasks on local data: ``--task-data DIR`` with DIR/piqa.jsonl, ... in the datasets' own fields,
run by lm-eval's own task configs; or your own YAMLs with ``--include-path``).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from ..errors import read_json
from ..eval import evaluate_perplexity, read_text_tokens, read_token_dir
from ..eval.harness import run_tasks
from ..io import atomic_write, load_model, load_tokenizer, tokenizer_identity
from .common import positive_int


def add_parser(sub):
    p = sub.add_parser(
        "eval",
        help="perplexity on held-out tokens/text, and zero-shot lm-eval tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run dir, checkpoint, HF model dir, .gguf, or 'smollm2'")
    p.add_argument("--data", help="token directory from `revllm data` (scores val.bin)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--text", help="raw UTF-8 text file to score")
    p.add_argument("--tasks", help="comma-separated lm-eval task names (e.g. revllm_commonsense,piqa)")
    p.add_argument("--include-path", action="append", help="folder of local lm-eval task YAMLs (repeatable)")
    p.add_argument(
        "--task-data",
        help="folder of {task}.jsonl (validation split, the dataset's fields) for the "
        "standard tasks piqa, arc_easy, arc_challenge, hellaswag, winogrande",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many documents per task")
    p.add_argument(
        "--seq-len", type=positive_int, default=None, help="window length >= 2 (default min(512, model maximum))"
    )
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--max-tokens", type=positive_int, default=None, help="score at most this many tokens")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    p.set_defaults(func=run)


def run(args):
    if not (args.data or args.text or args.tasks):
        raise ValueError("nothing to evaluate: give --data DIR, --text FILE and/or --tasks NAMES")
    model = load_model(args.model).eval()
    results = {"model": str(args.model)}
    tokenizer = load_tokenizer(args.model, required=bool(args.text or args.tasks))
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if args.seq_len is None:
        args.seq_len = min(512, max_pos or 512)
    if args.seq_len < 2:
        raise ValueError(f"--seq-len {args.seq_len}: a window needs at least 2 tokens (one to predict from)")
    if max_pos and args.seq_len > max_pos:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings={max_pos}")
    for name, path in (("data", args.data), ("text", args.text)):
        if not path:
            continue
        ids = read_token_dir(path, args.split, args.max_tokens) if name == "data" else read_text_tokens(tokenizer, path)
        if name == "data" and tokenizer is not None:
            _check_data_tokenizer(path, tokenizer)
        if int(ids.max()) >= model.config.vocab_size:
            raise ValueError(
                f"{path} holds token id {int(ids.max())} >= the model's vocab_size={model.config.vocab_size}: "
                "tokenize with the model's tokenizer"
            )
        r = evaluate_perplexity(model, ids, args.seq_len, args.batch_size, args.max_tokens, progress=True)
        results[name] = r
        print(f"{name} {path}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  ({r['tokens']} tokens)")
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        res = run_tasks(
            model,
            tokenizer,
            tasks,
            args.include_path,
            args.batch_size,
            args.limit,
            max_length=max_pos,
            task_data=args.task_data,
        )
        results["tasks"] = res
        print("| task | metric | value |\n|---|---|---|")
        for task, metrics in res.items():
            for m, v in metrics.items():
                if isinstance(v, float) and "stderr" not in m:
                    print(f"| {task} | {m.split(',')[0]} | {v:.4f} |")
    if args.json_out:
        atomic_write(Path(args.json_out), json.dumps(results, indent=1, default=str))
    return 0


def _check_data_tokenizer(path, tokenizer) -> None:
    """Warn when a token directory was made with another tokenizer than the model's: the ids would then
    mean other text, and the perplexity would not be the model's on the corpus."""
    made = read_json(Path(path) / "meta.json", f"{path} has no meta.json").get("tokenizer") or {}
    if made.get("sha256") and made["sha256"] != tokenizer_identity(tokenizer, "model")["sha256"]:
        warnings.warn(
            f"{path} was tokenized with {made.get('name')!r}, not with the model's tokenizer: "
            "its perplexity is not the model's on that corpus (re-run `revllm data` with the model's tokenizer)"
        )
