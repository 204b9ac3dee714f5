"""Tokenize text into nanoGPT-style token files: ``DIR/train.bin``, ``DIR/val.bin``, ``DIR/meta.json``.

Inputs: text files, folders (recursive, text suffixes), JSONL (one document per line, ``text_key``),
and Hugging Face datasets saved with ``save_to_disk``. Everything streams: files are read in
line-aligned chunks of ~1 MB and tokens are appended to the .bin files, so a corpus larger than RAM
works. Documents are separated by the tokenizer's end-of-text token.

Validation split: the token stream is cut into blocks of ``VAL_BLOCK`` tokens and the last
``val_fraction`` of each block goes to val.bin. This needs no second pass, spreads the held-out text
over the whole corpus, and gives a non-empty val split for any non-empty input (even one file).
With ``split="document"`` whole documents are held out instead (a text file, a JSONL line or a dataset
row is one document): document i goes to val.bin when floor((i+1) f) > floor(i f), i.e. every 1/f-th
document, so no held-out text shares a document with the training text (needs >= 1/f documents).

dtype: uint16 when the vocabulary fits (<= 65536 ids), else uint32. ``meta.json`` records the
tokenizer's identity (name, sha256 of tokenizer.json, vocab size, separator id) and is written last and
atomically; the tokenizer itself is copied to ``DIR/tokenizer/`` so the token dir is self-contained.
The .bin files are written under temporary names and renamed at the end: a failed run never damages
an existing token dir.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import RevLLMError
from ..io import atomic_write, load_tokenizer, replace_dir, tokenizer_identity

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".tex", ".html", ".htm", ".py", ".csv", ".org", ""}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
CHUNK_CHARS = 1 << 20
VAL_BLOCK = 1 << 16


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a multi-byte char cut at the 8 KiB boundary is fine
    return False


def _expand(inputs) -> list[tuple[str, Path]]:
    """(kind, path) for every input; kind is text | jsonl | hf."""
    out = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
        if p.is_dir():
            if (
                (p / "dataset_info.json").is_file()
                or (p / "dataset_dict.json").is_file()
                or (p / "state.json").is_file()
            ):
                out.append(("hf", p))
                continue
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not any(s.startswith(".") for s in f.relative_to(p).parts)
                and (f.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES or f.name.endswith(".rst.txt"))
            )
            if not files:
                raise RevLLMError(
                    f"folder {p} holds no text files ({', '.join(sorted(s for s in TEXT_SUFFIXES if s))}, .jsonl)"
                )
            out.extend(("jsonl" if f.suffix.lower() in JSONL_SUFFIXES else "text", f) for f in files)
        else:
            out.append(("jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "text", p))
    for kind, p in out:
        if kind != "hf":
            if p.stat().st_size == 0:
                raise RevLLMError(f"input {p} is empty")
            if _looks_binary(p):
                raise RevLLMError(f"input {p} looks binary (not UTF-8 text); pass text, JSONL or a saved HF dataset")
    return out


def _documents(kind: str, path: Path, text_key: str):
    """Yield lists of text pieces; each yielded list is one document (pieces are ~1 MB chunks)."""
    if kind == "text":
        with open(path, encoding="utf-8", errors="strict") as f:
            doc, size = [], 0
            for line in f:
                doc.append(line)
                size += len(line)
                if size >= CHUNK_CHARS:
                    yield ["".join(doc)], False  # more of the same document follows
                    doc, size = [], 0
            yield ["".join(doc)], True
    elif kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RevLLMError(f"{path}:{n} is not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(text_key), str):
                    raise RevLLMError(f"{path}:{n} has no string field {text_key!r} (set --text-key)")
                yield [rec[text_key]], True
    else:
        import datasets  # optional (the data extra): only saved HF datasets need it

        ds = datasets.load_from_disk(str(path))
        splits = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
        for split in splits:
            if text_key not in split.column_names:
                raise RevLLMError(
                    f"dataset {path} has no column {text_key!r} (columns: {', '.join(split.column_names)}); set --text-key"
                )
            for batch in split.iter(batch_size=256):
                for text in list(batch[text_key]):
                    yield [text or ""], True


def documents(inputs, text_key: str = "text"):
    """Yield each input document's full text, numbered as ``prepare_tokens`` numbers them (so
    ``held_out(i, f)`` says which go to val.bin under ``split="document"``)."""
    for kind, path in _expand(inputs):
        parts = []
        for pieces, doc_end in _documents(kind, path, text_key):
            parts.extend(pieces)
            if doc_end:
                yield "".join(parts)
                parts = []


def held_out(i: int, fraction: float) -> bool:
    """Document i goes to val: every 1/fraction-th document, spread evenly over the input order."""
    return int((i + 1) * fraction) > int(i * fraction)


def _check_options(val_fraction: float, split: str) -> None:
    if not 0.0 < val_fraction < 0.5:
        raise RevLLMError(f"--val-fraction {val_fraction} must be in (0, 0.5)")
    if split not in ("block", "document"):
        raise RevLLMError(f"split={split!r} is unknown; allowed: block, document")


def _check_counts(counts: dict, n_docs: int, sources, split: str, val_fraction: float) -> None:
    """Refuse inputs that gave no text, or too few documents for a by-document split."""
    if counts["train"] < 2 or sum(counts.values()) <= n_docs:
        raise RevLLMError(f"the inputs hold no text to tokenize ({', '.join(str(p) for _, p in sources)})")
    if split == "document" and counts["val"] == 0:
        raise RevLLMError(
            f"a by-document split at val_fraction={val_fraction} needs at least "
            f"{math.ceil(1 / val_fraction)} documents; the inputs hold {n_docs}"
        )


def _publish(out: Path, tmp: dict, tok, meta: dict) -> None:
    """Everything is written beside the old files first; then meta.json goes (the dir reads as incomplete),
    the renames happen, and the new meta.json comes last: a token dir without meta.json is incomplete."""
    tok_tmp = out / ".tokenizer.tmp"
    shutil.rmtree(tok_tmp, ignore_errors=True)
    tok.save_pretrained(tok_tmp)
    (out / "meta.json").unlink(missing_ok=True)
    for s, p in tmp.items():  # streamed files, finished: each renamed into place
        os.replace(p, out / f"{s}.bin")
    replace_dir(tok_tmp, out / "tokenizer")
    atomic_write(out / "meta.json", json.dumps(meta, indent=1))


def prepare_tokens(
    inputs, out, tokenizer="smollm2", val_fraction=0.005, text_key="text", progress=True, split="block"
) -> dict:
    """Tokenize ``inputs`` into ``out``; returns the meta dict (also written to ``out/meta.json``).
    ``split``: ``block`` (a fraction of every 64k-token block) or ``document`` (whole documents held out)."""
    _check_options(val_fraction, split)
    sources = _expand(inputs)
    tok = load_tokenizer(tokenizer)
    ident = tokenizer_identity(tok, str(tokenizer))
    dtype = np.uint16 if ident["vocab_size"] <= 1 << 16 else np.uint32
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {s: out / f".{s}.bin.tmp-{os.getpid()}" for s in ("train", "val")}
    counts = {"train": 0, "val": 0}
    n_docs, buf = 0, []
    total_bytes = sum(p.stat().st_size for k, p in sources if k != "hf") or None

    def flush(final=False):
        nonlocal buf
        if split == "document":  # the whole buffer belongs to the current document's split
            if buf:
                dest = "val" if held_out(n_docs, val_fraction) else "train"
                np.asarray(buf, dtype=dtype).tofile(files[dest])
                counts[dest] += len(buf)
                buf = []
            return
        while buf and (len(buf) >= VAL_BLOCK or final):
            block, buf = buf[:VAL_BLOCK], buf[VAL_BLOCK:]
            n_val = max(1, int(round(len(block) * val_fraction)))
            for name, part in (("train", block[:-n_val]), ("val", block[-n_val:])):
                np.asarray(part, dtype=dtype).tofile(files[name])
                counts[name] += len(part)

    files = {s: open(p, "wb") for s, p in tmp.items()}
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            for kind, path in sources:
                try:
                    for pieces, doc_end in _documents(kind, path, text_key):
                        for text in pieces:
                            if text:
                                buf.extend(tok(text, add_special_tokens=False)["input_ids"])
                            if kind != "hf":
                                bar.update(len(text.encode("utf-8")))
                        if doc_end:
                            buf.append(ident["separator_id"])
                        flush()  # before n_docs moves on: a by-document split routes buf by it
                        n_docs += doc_end
                except UnicodeDecodeError as e:  # past the head that _looks_binary sniffed
                    raise RevLLMError(
                        f"{path} is not UTF-8 text ({e.reason} at a byte {e.start} of a read chunk)"
                    ) from None
            flush(final=True)
        for f in files.values():
            f.close()
        _check_counts(counts, n_docs, sources, split, val_fraction)
        meta = {
            "format": "revllm-tokens-1",
            "dtype": np.dtype(dtype).name,
            "tokenizer": ident,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "documents": n_docs,
            "val_fraction": val_fraction,
            "split": split,
            "requested": [str(p) for p in inputs],
            "inputs": [str(p) for _, p in sources],
        }
        _publish(out, tmp, tok, meta)
        return meta
    finally:
        for f in files.values():
            f.close()
        for p in tmp.values():
            p.unlink(missing_ok=True)
        shutil.rmtree(out / ".tokenizer.tmp", ignore_errors=True)
