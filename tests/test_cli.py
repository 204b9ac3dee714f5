"""The revllm console script end to end on a tiny corpus: data -> train -> (eval) -> generate -> report,
exit codes and one-line errors for bad input, and resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import corpus_dir, tiny_tokenizer, token_dir  # noqa: F401

from revllm import io as rio
from revllm.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = "--layers 2 --hidden 32 --heads 4 --kv-heads 2 --seq-len 32 --batch-size 4 --warmup 2 --lr 3e-3 --eval-iters 2 --loss-chunk-size 32 --no-progress".split()


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "revllm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        **kw,
    )


def test_pipeline_end_to_end(tmp_path, corpus_dir, tiny_tokenizer, capsys):
    tok = tmp_path / "tok"
    assert (
        main(
            [
                "data",
                str(corpus_dir),
                "--out",
                str(tok),
                "--tokenizer",
                str(tiny_tokenizer),
                "--val-fraction",
                "0.1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "train +" in capsys.readouterr().out
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("max-steps: 4\neval_interval: 2\ncheckpoint_interval: 2\nlog_interval: 1\n")
    for dyn in ("midpoint", "euler"):
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(tok),
                    "--out",
                    str(tmp_path / dyn),
                    "--config",
                    str(cfg),
                    "--dynamics",
                    dyn,
                    *TINY,
                ]
            )
            == 0
        )
    assert "val loss" in capsys.readouterr().out
    s = json.loads((tmp_path / "midpoint" / "summary.json").read_text())
    assert s["steps"] == 4 and s["config"]["layers"] == 2 and s["memory_free"]
    try:
        import revllm.commands.eval  # noqa: F401  (built by another issue; checked when present)

        assert main(["eval", str(tmp_path / "midpoint"), "--data", str(tok), "--seq-len", "32"]) == 0
        assert "perplexity" in capsys.readouterr().out
    except ImportError:
        pass
    assert (
        main(
            [
                "generate",
                str(tmp_path / "midpoint"),
                "--prompt",
                "In the beginning",
                "--max-new-tokens",
                "5",
                "--greedy",
            ]
        )
        == 0
    )
    g1 = capsys.readouterr().out
    assert g1.startswith("In the beginning") and len(g1) > len("In the beginning")
    assert (
        main(
            [
                "generate",
                str(tmp_path / "midpoint"),
                "--prompt",
                "In the beginning",
                "--max-new-tokens",
                "5",
                "--greedy",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == g1  # greedy is deterministic
    assert (
        main(
            [
                "generate",
                str(tmp_path / "midpoint"),
                "--prompt",
                "The lord",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0.9",
                "--top-k",
                "20",
                "--top-p",
                "0.9",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("The lord")
    assert main(["report", str(tmp_path / "midpoint"), str(tmp_path / "euler"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| midpoint | midpoint | yes | 4 |" in md and "| euler | euler | no | 4 |" in md
    assert "midpoint vs euler: activation memory x" in md
    for png in ("loss.png", "memory_throughput.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"


def test_exit_codes_subprocess(tmp_path, token_dir):
    r = _cli("data", tmp_path / "missing.txt", "--out", tmp_path / "t")
    # the whole of stderr is the one line (not just its last line)
    assert r.returncode == 2 and r.stderr == f"revllm data: error: input {tmp_path / 'missing.txt'} does not exist\n"
    r = _cli("train", "--data", token_dir, "--out", tmp_path / "r", "--dynamics", "rk4", *TINY)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    last = r.stderr.strip()
    assert last.startswith("revllm train: error: dynamics='rk4' is unknown; allowed:") and "midpoint" in last


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_inputs_one_line_errors(tmp_path, token_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(token_dir), "--bogus-flag", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus-flag" in capsys.readouterr().err
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(token_dir),
                "--out",
                str(run),
                "--max-steps",
                "2",
                "--checkpoint-interval",
                "1",
                *TINY,
            ]
        )
        == 0
    )
    capsys.readouterr()
    y = tmp_path / "c.yaml"
    y.write_text("nonsense_key: 1\n")
    assert main(["train", "--data", str(token_dir), "--out", str(tmp_path / "x"), "--config", str(y)]) == 2
    assert "unknown key 'nonsense_key'" in _err(capsys)
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in _err(capsys)
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    (empty / "meta.json").write_text((token_dir / "meta.json").read_text())
    (empty / "train.bin").write_bytes(b"")
    (empty / "val.bin").write_bytes(b"")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "is empty" in _err(capsys)
    # a truncated safetensors file in the newest checkpoint: generate refuses it, resume falls back
    newest = rio.list_checkpoints(run)[-1]
    with open(newest / "model" / "model.safetensors", "r+b") as f:
        f.truncate(64)
    assert main(["generate", str(newest), "--prompt", "x", "--greedy", "--max-new-tokens", "2"]) == 2
    assert "corrupted" in _err(capsys)
    assert (
        main(["train", "--data", str(token_dir), "--out", str(run), "--resume", "--max-steps", "3", "--no-progress"])
        == 0
    )
    assert "is corrupted (" in capsys.readouterr().err
    # resumed from step 1 (the good one); step 2 was redone and replaced the corrupted copy; keep_last=2
    assert [c.name for c in rio.list_checkpoints(run)] == ["step_00000002", "step_00000003"]
    for c in rio.list_checkpoints(run):
        rio.verify(c)


@pytest.mark.slow
def test_kill9_then_resume_bit_identical(tmp_path, token_dir):
    """kill -9 during training, then --resume: final weights equal an uninterrupted run's (CPU, same seed)."""
    args = [
        "--data",
        token_dir,
        "--max-steps",
        "16",
        "--checkpoint-interval",
        "2",
        "--keep-last",
        "2",
        "--eval-interval",
        "10",
        *TINY,
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "revllm.cli", "train", "--out", str(killed), *map(str, args)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_00000004").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    r = _cli("train", "--out", killed, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    # saving a checkpoint imports DeepSpeed (through transformers) where it is installed: no accelerator warning
    assert "Setting accelerator" not in r.stdout + r.stderr, r.stdout
    full = tmp_path / "full"
    assert main(["train", "--out", str(full), *map(str, args)]) == 0
    a, b = rio.load_model(killed).state_dict(), rio.load_model(full).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offline_reaches_huggingface_hub_already_imported(monkeypatch):
    import huggingface_hub.constants as hub

    from revllm.commands.common import offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # as if imported before offline() ran
    offline()
    assert hub.HF_HUB_OFFLINE is True


def test_demo_never_replaces_a_run_it_did_not_make(tmp_path, corpus_dir, capsys):
    user_run = tmp_path / "demo" / "euler"
    (user_run / "checkpoints").mkdir(parents=True)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--corpus", str(corpus_dir), "--steps", "1"]) == 2
    assert "was not made by `revllm demo`" in _err(capsys)
    assert (user_run / "checkpoints").is_dir() and not (tmp_path / "demo" / "data").exists()  # refused before any work


def test_out_that_is_a_file_is_a_one_line_error(tmp_path, corpus_dir, tiny_tokenizer, capsys):
    f = tmp_path / "a_file"
    f.write_text("mine")
    assert main(["data", str(corpus_dir), "--out", str(f), "--tokenizer", str(tiny_tokenizer)]) == 2
    assert "File exists" in _err(capsys) and f.read_text() == "mine"


def test_train_exact_reversal_flag(tmp_path, token_dir, capsys):
    """`--exact-reversal` reaches the model (int64 streams, saved in its config) and trains; on a rule that
    cannot be reversed it is one line and exit 2."""
    flags = ["--data", token_dir, "--layers", "2", "--hidden", "32", "--heads", "4", "--seq-len", "16"]
    flags += ["--batch-size", "2", "--max-steps", "2", "--eval-interval", "2", "--eval-iters", "1", "--no-progress"]
    out = tmp_path / "lf"
    assert main(["train", "--out", str(out), "--dynamics", "leapfrog", "--exact-reversal", *map(str, flags)]) == 0
    cfg = rio.load_model(out).config
    assert cfg.exact_reversal is True and cfg.dynamics == "leapfrog"
    capsys.readouterr()
    assert (
        main(["train", "--out", str(tmp_path / "eu"), "--dynamics", "euler", "--exact-reversal", *map(str, flags)]) == 2
    )
    err = _err(capsys)
    assert "exact_reversal=True needs a reversible dynamics; 'euler' is not" in err and len(err.splitlines()) == 1
