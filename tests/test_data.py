"""revllm data: token files from text/folders/JSONL/HF datasets; validation of bad input."""

import json

import numpy as np
import pytest
from pipeline_fixtures import corpus_dir, make_text, tiny_tokenizer, token_dir  # noqa: F401

from revllm.data import TokenData, WindowSampler, prepare_tokens
from revllm.errors import RevLLMError


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_folder_tokens_roundtrip(token_dir, corpus_dir, tiny_tokenizer):
    meta = json.loads((token_dir / "meta.json").read_text())
    tok = _tok(tiny_tokenizer)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    docs = [(corpus_dir / "a.txt").read_text(), (corpus_dir / "sub" / "b.md").read_text()]
    expect = []
    for d in docs:
        expect += tok(d, add_special_tokens=False)["input_ids"] + [sep]
    data = TokenData(token_dir)
    assert data.train.dtype == np.uint16 and meta["dtype"] == "uint16"
    # one split block (the corpus is < VAL_BLOCK tokens): train is its head, val its tail
    assert np.concatenate([data.train, data.val]).tolist() == expect
    assert meta["val_tokens"] == round(len(expect) * 0.1)
    assert meta["documents"] == 2 and meta["tokenizer"]["vocab_size"] == len(tok)
    assert meta["tokenizer"]["separator_id"] == sep and len(meta["tokenizer"]["sha256"]) == 64
    assert (token_dir / "tokenizer" / "tokenizer.json").is_file()


def test_jsonl_and_hf_dataset(tmp_path, tiny_tokenizer):
    import datasets

    texts = [make_text(i, 30) for i in range(4)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "ds"))
    a = prepare_tokens([tmp_path / "c.jsonl"], tmp_path / "ta", str(tiny_tokenizer), text_key="body", progress=False)
    b = prepare_tokens([tmp_path / "ds"], tmp_path / "tb", str(tiny_tokenizer), text_key="body", progress=False)
    assert a["documents"] == b["documents"] == 4
    for s in ("train", "val"):
        assert (tmp_path / "ta" / f"{s}.bin").read_bytes() == (tmp_path / "tb" / f"{s}.bin").read_bytes()
    with pytest.raises(RevLLMError, match="no string field 'text'"):
        prepare_tokens([tmp_path / "c.jsonl"], tmp_path / "tc", str(tiny_tokenizer), progress=False)


def test_streams_in_chunks_and_spreads_val(tmp_path, tiny_tokenizer, monkeypatch):
    import revllm.data.prepare as prep

    monkeypatch.setattr(prep, "CHUNK_CHARS", 500)  # many chunks per file
    monkeypatch.setattr(prep, "VAL_BLOCK", 1000)  # many split blocks
    (tmp_path / "big.txt").write_text(make_text(5, 2000))
    meta = prepare_tokens(
        [tmp_path / "big.txt"], tmp_path / "t", str(tiny_tokenizer), val_fraction=0.05, progress=False
    )
    total = meta["train_tokens"] + meta["val_tokens"]
    assert meta["documents"] == 1 and total > 5000
    assert abs(meta["val_tokens"] - 0.05 * total) <= total // 1000 + 1


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "empty_folder", "bad_json", "late_bad_utf8"])
def test_bad_input_keeps_existing_tokens(tmp_path, tiny_tokenizer, token_dir, case):
    import shutil

    out = tmp_path / "tok"
    shutil.copytree(token_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = {
        "missing": tmp_path / "nope.txt",
        "empty": tmp_path / "empty.txt",
        "binary": tmp_path / "x.txt",
        "empty_folder": tmp_path / "folder",
        "bad_json": tmp_path / "x.jsonl",
        "late_bad_utf8": tmp_path / "late.txt",
    }[case]
    if case == "empty":
        bad.write_text("")
    elif case == "binary":
        bad.write_bytes(bytes(range(256)) * 10)
    elif case == "empty_folder":
        bad.mkdir()
        (bad / "image.png").write_bytes(b"\x89PNG")
    elif case == "bad_json":
        bad.write_text('{"text": "fine"}\n{oops\n')
    elif case == "late_bad_utf8":  # clean head (passes the binary sniff), a bad byte far past it
        bad.write_bytes(b"In the beginning was the word.\n" * 2000 + b"\xff\xfe bad\n")
    msg = {
        "missing": "does not exist",
        "empty": "is empty",
        "binary": "looks binary",
        "empty_folder": "no text files",
        "bad_json": "not valid JSON",
        "late_bad_utf8": "late.txt is not UTF-8 text",
    }[case]
    with pytest.raises((RevLLMError, FileNotFoundError), match=msg):
        prepare_tokens([bad], out, str(tiny_tokenizer), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_token_data_checks(tmp_path, token_dir):
    import shutil

    data = TokenData(token_dir)
    with pytest.raises(RevLLMError, match="vocabulary"):
        data.check(seq_len=8, vocab_size=10)
    with pytest.raises(RevLLMError, match="val.bin has"):
        data.check(seq_len=len(data.val) + 5, vocab_size=1000)
    theirs = data.meta["tokenizer"]["name"]
    with pytest.raises(RevLLMError, match=f"different tokenizer \\({theirs!r}\\) than the model's \\('mine'\\)"):
        data.check(seq_len=8, vocab_size=1000, tokenizer={"name": "mine", "sha256": "0" * 64})
    data.check(seq_len=8, vocab_size=1000, tokenizer={"name": "mine", "sha256": data.meta["tokenizer"]["sha256"]})
    t = tmp_path / "t"
    shutil.copytree(token_dir, t)
    with open(t / "train.bin", "r+b") as f:
        f.truncate((t / "train.bin").stat().st_size - 1)
    with pytest.raises(RevLLMError, match="truncated"):
        TokenData(t)
    (t / "meta.json").unlink()
    with pytest.raises(RevLLMError, match="no meta.json"):
        TokenData(t)


def test_sampler_state_roundtrip(token_dir):
    data = TokenData(token_dir)
    a = WindowSampler(data.train, 3, 16, seed=7)
    a.next()
    st = a.state()
    want = a.next()
    b = WindowSampler(data.train, 3, 16, seed=123)
    b.load_state(json.loads(json.dumps(st)))  # the state survives JSON (it is stored in trainer_state.json)
    assert b.next().equal(want)


def test_cli_split_by_document(tmp_path, tiny_tokenizer):
    """`revllm data --split document` holds out whole documents: at fraction 0.34 the third of three
    files is val.bin, token for token, and the first two are train.bin."""
    from revllm.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [make_text(seed, 80) for seed in (1, 2, 3)]
    for i, text in enumerate(texts):
        (corpus / f"{i}.txt").write_text(text)
    out = tmp_path / "tok"
    assert (
        main(
            [
                "data",
                str(corpus),
                "--out",
                str(out),
                "--tokenizer",
                str(tiny_tokenizer),
                "--val-fraction",
                "0.34",
                "--split",
                "document",
                "--no-progress",
            ]
        )
        == 0
    )
    tok = _tok(tiny_tokenizer)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [sep] for t in texts]
    data = TokenData(out)
    assert data.train.tolist() == ids[0] + ids[1] and data.val.tolist() == ids[2]
    assert json.loads((out / "meta.json").read_text())["split"] == "document"
