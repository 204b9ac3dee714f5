"""Issue 16: what a new user hit. Non-finite checkpoints, a full disk during a save, stale temp dirs,
silent changes on resume, validation and logs under several processes, launchers, lm-eval's command
line, command-line errors, and the KV cache's exactness claim."""

import csv
import os
import resource
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import DIST, corpus_dir, tiny_tokenizer, tiny_train_config, token_dir  # noqa: F401

from revllm import io as rio
from revllm.cli import main
from revllm.errors import RevLLMError
from revllm.io import load_model
from revllm.train import checkpoint as ckpt_io
from revllm.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = "--layers 2 --hidden 32 --heads 4 --kv-heads 2 --seq-len 32 --batch-size 4 --warmup 2 --eval-iters 2 --loss-chunk-size 32 --no-progress".split()


def _cli(*args, preexec_fn=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "revllm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=preexec_fn,
    )


def _rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _all_finite(run):
    for c in rio.list_checkpoints(run):
        sd = load_model(c).state_dict()  # refuses non-finite weights itself
        assert all(torch.isfinite(v).all() for v in sd.values()), c


# -- 1. non-finite checkpoints --------------------------------------------------------------------
def test_nonfinite_counts_nan_and_inf_not_large_values():
    ts = [torch.ones(3), torch.tensor([1e38, -3e38]), torch.full((5,), 1e30), torch.zeros(0), torch.arange(3)]
    assert rio.nonfinite(ts) == 0  # huge finite values do not overflow a max-abs reduction
    ts += [torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")], dtype=torch.bfloat16)]
    assert rio.nonfinite(ts) == 2


def test_parameters_poisoned_after_a_finite_loss_are_never_saved(tmp_path, token_dir):
    """The loss of step 2 is finite, but the weights it leaves are not: step 2 is not saved, and the error
    names step 1, a checkpoint that really is good."""
    calls = {"n": 0}

    def poison(opt, args, kwargs):  # after the update of step 2, whose loss was finite
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].view(-1)[0] = float("inf")

    from torch.optim.optimizer import register_optimizer_step_post_hook

    run = tmp_path / "run"
    handle = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(RevLLMError, match=r"NaN/inf at step 2 .*last good checkpoint: .*step_00000001"):
            train(tiny_train_config(token_dir, run, checkpoint_interval=1))
    finally:
        handle.remove()
    assert calls["n"] == 2
    assert [c.name for c in rio.list_checkpoints(run)] == ["step_00000001"]
    _all_finite(run)


def test_cli_lr_1e6_stops_with_a_good_checkpoint_and_eval_generate_refuse_nan(tmp_path, token_dir):
    run = tmp_path / "run"
    r = _cli(
        "train",
        "--data",
        token_dir,
        "--out",
        run,
        *TINY,
        "--lr",
        "1e6",
        "--min-lr",
        "1",
        "--max-steps",
        "8",
        "--checkpoint-interval",
        "1",
        "--keep-last",
        "0",
    )
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("revllm train: error: ") and "training stopped" in last
    saved = rio.list_checkpoints(run)
    assert f"last good checkpoint: {saved[-1] if saved else 'none'}" in last
    _all_finite(run)
    # a model with NaN weights (as the old code saved them): generate and eval refuse it in one line
    from conftest import tiny_config

    import revllm

    model = revllm.RevLLMForCausalLM(tiny_config(vocab_size=300))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    for args in (
        ["generate", tmp_path / "nan", "--prompt", "the", "--tokenizer", token_dir / "tokenizer", "--greedy"],
        ["eval", tmp_path / "nan", "--data", token_dir, "--seq-len", "16"],
    ):
        r = _cli(*args)
        assert r.returncode == 2 and "non-finite weights" in r.stderr.strip().splitlines()[-1], r.stderr
        assert "Traceback" not in r.stderr


# -- 2. full disk, stale temp dirs --------------------------------------------------------------
def test_full_disk_during_save_is_one_line_and_keeps_earlier_checkpoints(tmp_path, token_dir):
    run = tmp_path / "run"
    common = ["--data", token_dir, "--out", run, *TINY, "--checkpoint-interval", "1", "--keep-last", "0"]
    assert _cli("train", *common, "--max-steps", "1").returncode == 0
    size = (run / "checkpoints/step_00000001/model/model.safetensors").stat().st_size

    def limit():  # `ulimit -f`: no file may grow past half a checkpoint's weights (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    r = _cli("train", *common, "--resume", "--max-steps", "3", preexec_fn=limit)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("revllm train: error: could not save checkpoint step 2 (")
    assert [c.name for c in rio.list_checkpoints(run)] == ["step_00000001"]
    rio.verify(run / "checkpoints/step_00000001")
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dir left


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_dirs_of_dead_writers_are_removed_at_the_next_start(tmp_path, token_dir, capsys):
    run = tmp_path / "run"
    train(tiny_train_config(token_dir, run, max_steps=1, checkpoint_interval=1))
    root = run / "checkpoints"
    host, dead = socket.gethostname(), _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    stale = [f".tmp-step_00000002-{host}-{dead}", f".tmp-step_00000002-{dead}", f".old-step_00000001-{host}-{dead}"]
    kept = [
        f".tmp-step_00000002-{host}-{live.pid}",  # another writer, still running
        f".tmp-step_00000002-other-host.example-{dead}",
    ]  # another host: cannot be checked, left alone
    for name in stale + kept:
        (root / name / "model").mkdir(parents=True)
    try:
        train(tiny_train_config(token_dir, run, resume=True, max_steps=2), explicit={"resume", "out", "max_steps"})
    finally:
        live.kill()
        live.wait()
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert left == sorted(kept)
    err = capsys.readouterr().err
    assert all(f"removed {root / n}" in err for n in stale)


def test_save_names_its_temp_dir_with_host_and_pid(tmp_path, token_dir, monkeypatch):
    seen = []
    real = ckpt_io.write_manifest
    monkeypatch.setattr(ckpt_io, "write_manifest", lambda root: (seen.append(root.name), real(root)))
    train(tiny_train_config(token_dir, tmp_path / "run", max_steps=1, checkpoint_interval=1))
    assert seen == [f".tmp-step_00000001-{socket.gethostname()}-{os.getpid()}"]


# -- 3. resume never changes the run silently ----------------------------------------------------
def test_resume_with_more_steps_keeps_the_schedule_and_says_so(tmp_path, token_dir, capsys):
    run, full = tmp_path / "run", tmp_path / "full"
    train(tiny_train_config(token_dir, run, max_steps=6, min_lr=1e-4))
    train(tiny_train_config(token_dir, full, max_steps=6, min_lr=1e-4))
    capsys.readouterr()
    train(tiny_train_config(token_dir, run, resume=True, max_steps=9), explicit={"resume", "out", "max_steps"})
    assert (
        "--max-steps 9 extends the run past the 6 steps its lr schedule planned: the schedule is kept, "
        "steps 7-9 run at its final lr 0.0001 (min_lr)"
    ) in capsys.readouterr().err
    lrs = [float(r["lr"]) for r in _rows(run)]
    assert lrs[:6] == [float(r["lr"]) for r in _rows(full)]  # the first 6 steps: the original schedule
    assert lrs[5:] == pytest.approx([1e-4] * 4, rel=1e-12)  # then its final lr, no jump


def test_world_size_change_keeps_the_global_batch_or_is_refused(tmp_path):
    from revllm.train.config import TrainConfig
    from revllm.train.loop import _keep_global_batch

    cfg = TrainConfig(batch_size=4, grad_accum=1, seq_len=32)
    _keep_global_batch(cfg, {"world_size": 2, "step": 3, "tokens": 3 * 256}, 1)
    assert cfg.grad_accum == 2  # 2 processes x 1 micro-batch -> 1 process x 2 micro-batches
    cfg = TrainConfig(batch_size=4, grad_accum=1, seq_len=32)
    _keep_global_batch(cfg, {"step": 3, "tokens": 3 * 256}, 1)  # older checkpoint: world size from the tokens
    assert cfg.grad_accum == 2
    cfg = TrainConfig(batch_size=4, grad_accum=1, seq_len=32)
    with pytest.raises(RevLLMError, match="relaunch on a number of processes that divides 2"):
        _keep_global_batch(cfg, {"world_size": 2, "step": 3, "tokens": 3 * 256}, 3)


def test_grad_accum_split_of_a_step_is_the_same_global_batch(tmp_path, token_dir):
    """batch 4 x accum 1 and batch 2 x accum 2 see the same rows each step: equal weights up to float
    summation order (what a resume on half the processes relies on)."""
    a = tmp_path / "a"
    b = tmp_path / "b"
    train(tiny_train_config(token_dir, a, batch_size=4, max_steps=3))
    train(tiny_train_config(token_dir, b, batch_size=2, grad_accum=2, max_steps=3))
    wa, wb = load_model(a).state_dict(), load_model(b).state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    assert [r["tokens"] for r in _rows(a)] == [r["tokens"] for r in _rows(b)]
    for ra, rb in zip(_rows(a), _rows(b)):
        if ra["val_loss"]:  # validation: eval_iters x the global batch, whatever the split
            assert abs(float(ra["val_loss"]) - float(rb["val_loss"])) <= 1e-5


# -- 7. the command line ---------------------------------------------------------------------------
def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_no_prefix_matching_and_subcommand_errors(capsys, token_dir, tmp_path):
    err = _usage_error(capsys, ["train", "--data", str(token_dir), "--out", str(tmp_path / "r"), "--max-step", "5"])
    assert err == [
        "revllm train: error: unrecognized arguments: --max-step 5",
        "hint: `revllm train --help` lists the arguments",
    ]
    err = _usage_error(capsys, ["generate", "x", "--max-new", "5"])
    assert err[0] == "revllm generate: error: unrecognized arguments: --max-new 5"
    err = _usage_error(capsys, ["train", "--lr", "abc"])
    assert err == [
        "revllm train: error: argument --lr: invalid float value: 'abc'",
        "hint: `revllm train --help` lists the arguments",
    ]


def test_read_only_out_names_the_fix(capsys, token_dir):
    # /sys refuses mkdir with EPERM even for root: a read-only parent as the issue met it
    assert main(["train", "--data", str(token_dir), "--out", "/sys/revllm-ro/run", *TINY, "--max-steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "revllm train: error: cannot write the run directory /sys/revllm-ro/run "
        "(Operation not permitted): choose a writable --out"
    )


def test_messages_during_training_are_not_glued_to_the_bar(tmp_path, token_dir):
    """With the bar on, the NaN stop's error starts its own line (the bar is closed first), and warnings
    during the loop are plain lines written through the bar."""
    r = _cli(
        "train",
        "--data",
        token_dir,
        "--out",
        tmp_path / "run",
        *TINY[:-1],
        "--lr",
        "1e6",
        "--max-steps",
        "8",
        "--checkpoint-interval",
        "1",
        "--progress",
    )
    assert r.returncode == 2
    assert any(line.startswith("revllm train: error: ") for line in r.stderr.split("\n")), repr(r.stderr[-600:])

    from revllm.train.loop import _warnings_through_bar

    with _warnings_through_bar():
        import io
        from contextlib import redirect_stderr

        buf = io.StringIO()
        with redirect_stderr(buf), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("drift above threshold")
    assert buf.getvalue() == "warning: drift above threshold\n"


# -- 3/4. several processes: validation windows, rank 0's summary, activation memory, world-size resume --
def _launch(nproc, *args):
    """`revllm ARGS` under torchrun with nproc processes (CPU, gloo); returns (stdout, stderr)."""
    from test_distributed import TIMEOUT_S, _free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "revllm.cli",
        *map(str, args),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout, r.stderr


@pytest.mark.slow
def test_two_processes_validate_like_one_and_resume_on_one(tmp_path, token_dir, capsys):
    """2 processes x batch 2 (DDP) against 1 process x batch 2 x grad_accum 2 (the same rows per step):
    the same validation loss (same windows, whatever the world size), one summary line (rank 0's), and a
    resume on 1 process keeps the global batch by doubling grad_accum and ends where the 1-process run does.
    FSDP2 counts the same activation bytes as DDP and as one process with the same per-process batch."""
    import json

    ddp = tmp_path / "ddp"
    out, _ = _launch(2, "train", "--data", token_dir, "--out", ddp, *DIST, "--stop-after", 2)
    assert out.count("val loss") == 1, out  # only rank 0 prints the summary
    ddp_act = json.loads((ddp / "summary.json").read_text())["activation_mb"]
    one = tmp_path / "one"
    ref = train(
        tiny_train_config(
            token_dir,
            one,
            dynamics="hamiltonian",
            batch_size=2,
            grad_accum=2,
            max_steps=4,
            eval_interval=2,
            checkpoint_interval=2,
        )
    )
    two_rows, one_rows = _rows(ddp), _rows(one)
    assert two_rows[1]["val_loss"] and abs(float(two_rows[1]["val_loss"]) - float(one_rows[1]["val_loss"])) <= 1e-5
    # resume the 2-process run on 1 process: grad_accum 1 -> 2 keeps the global batch of 4 rows
    capsys.readouterr()
    s = train(tiny_train_config(token_dir, ddp, resume=True, batch_size=2), explicit={"resume", "out"})
    assert (
        "resuming on 1 process(es) instead of 2: grad_accum 1 -> 2 keeps the global batch of 4 rows per step"
        in capsys.readouterr().err
    )
    assert s["steps"] == 4 and s["tokens"] == ref["tokens"]
    w2, w1 = load_model(ddp).state_dict(), load_model(one).state_dict()
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) <= 1e-5
    assert abs(s["val_loss"] - ref["val_loss"]) <= 1e-5
    # activation memory: FSDP2 (its gathered weights excluded) = DDP = one process, batch 2 per process
    fsdp = tmp_path / "fsdp"
    _launch(2, "train", "--data", token_dir, "--out", fsdp, *DIST, "--stop-after", 1, "--parallel", "fsdp2")
    single = train(tiny_train_config(token_dir, tmp_path / "single", dynamics="hamiltonian", batch_size=2, max_steps=1))
    acts = {
        "ddp": ddp_act,
        "fsdp2": json.loads((fsdp / "summary.json").read_text())["activation_mb"],
        "one": single["activation_mb"],
    }
    assert acts["fsdp2"] == acts["ddp"] == acts["one"] > 0, acts


# -- 6. lm-eval's command line on a revllm model -------------------------------------------------------
def test_revllm_lm_eval_hands_its_arguments_to_lm_eval_and_refuses_remote_code(capsys):
    assert main(["lm-eval", "run", "--help"]) == 0  # lm-eval's own --help: the arguments reach its parser unchanged
    assert "--model_args" in capsys.readouterr().out
    for bad in (["--trust_remote_code"], ["--model_args", "pretrained=x,trust_remote_code=True"]):
        assert main(["lm-eval", "--model", "hf", "--tasks", "t", *bad]) == 2
        assert capsys.readouterr().err.startswith("revllm lm-eval: error: trust_remote_code is refused")


@pytest.mark.slow  # lm-eval's CLI indexes its whole task registry: about 2 minutes on the shared 2-core machine
def test_revllm_lm_eval_runs_lm_evals_cli_on_a_saved_model(tmp_path, tiny_tokenizer):
    """`lm_eval --model hf --model_args pretrained=DIR` alone fails on a revllm dir (unknown model type);
    `revllm lm-eval` with the same arguments runs lm-eval's CLI on it, no device flag, no remote code."""
    import json

    from conftest import tiny_config
    from transformers import AutoTokenizer

    import revllm
    from revllm.eval.harness import _render_builtin

    model_dir, tasks, out = tmp_path / "model", tmp_path / "tasks", tmp_path / "out"
    tasks.mkdir()
    _render_builtin(tasks)  # the built-in revllm_commonsense task, a local JSONL
    torch.manual_seed(0)
    revllm.RevLLMForCausalLM(tiny_config(vocab_size=300)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(model_dir)
    args = [
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir}",
        "--tasks",
        "revllm_commonsense",
        "--include_path",
        tasks,
        "--limit",
        "4",
        "--batch_size",
        "2",
        "--output_path",
        out,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    plain = subprocess.run(
        [sys.executable, "-m", "lm_eval", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert plain.returncode != 0 and "revllm" in plain.stderr  # what the user met: lm-eval alone cannot load it
    r = _cli("lm-eval", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "revllm_commonsense" in r.stdout and "acc" in r.stdout  # lm-eval's own results table
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0.0 <= result["results"]["revllm_commonsense"]["acc,none"] <= 1.0
    r = _cli(
        "lm-eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},trust_remote_code=True",
        "--tasks",
        "revllm_commonsense",
    )
    assert r.returncode == 2 and r.stderr.strip() == (
        "revllm lm-eval: error: trust_remote_code is refused: revllm's "
        "classes are registered by this command (no remote code runs); drop it"
    )


# -- 8. what the KV cache reproduces, exactly ----------------------------------------------------------
@pytest.mark.parametrize("block", ["llama", "gpt2"])
def test_exact_mode_generation_what_the_cache_reproduces(block):
    """The README's statement, measured: in exact mode the prefill's logits are the uncached forward's bit
    for bit; each later cached position differs from an uncached forward over the same prefix by float
    rounding only (1-row matmuls round differently from full-length ones), here <= 1e-5 over 20 tokens,
    and the greedy tokens are the same."""
    from conftest import tiny_model

    model = tiny_model(block=block, dynamics="midpoint_a", midpoint_a=1 / 16, exact_reversal=True).eval()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=20,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        plain = [model(out.sequences[:, : 6 + i], use_cache=False).logits[:, -1] for i in range(20)]
    assert torch.equal(out.logits[0], plain[0])  # the prefill: bit for bit
    assert max((c - p).abs().max().item() for c, p in zip(out.logits, plain)) <= 1e-5
    assert all(torch.equal(c.argmax(-1), p.argmax(-1)) for c, p in zip(out.logits, plain))
