"""DDP and FSDP2 against single-process training (CPU, gloo, 2 processes launched by torchrun).

The per-rank code is tests/dist_worker.py. Each scenario is launched once per module (about 20 s of
process start-up and work on 2 cores) and the tests below read its results. Each launch gets a free
port and a timeout, so a hang fails the test instead of blocking the suite.
"""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from pipeline_fixtures import DIST, corpus_dir, tiny_tokenizer, token_dir  # noqa: F401  (revllm train fixtures)

from revllm.errors import CheckpointError, RevLLMError
from revllm.parallel import load_sharded, parallelize, save_sharded
from revllm.parallel.checkpoint import SafeFileSystemReader

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, env=None, timeout=TIMEOUT_S):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(HERE / "dist_worker.py"),
        *map(str, args),
    ]
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.communicate()
        pytest.fail(f"torchrun {args[0]} hung for more than {timeout} s")
    assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "grads.json"
    _torchrun("grads", out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def training(tmp_path_factory, token_dir):
    d = tmp_path_factory.mktemp("dist")
    _torchrun("train", d / "train.json", d / "ckpt", token_dir)
    return json.loads((d / "train.json").read_text()) | {"dir": d}


FP32_CASES = "ddp-llama-midpoint ddp-llama-hamiltonian ddp-gpt2-midpoint ddp-llama-midpoint_a-fixed_point fsdp2-llama-midpoint fsdp2-llama-hamiltonian fsdp2-gpt2-hamiltonian fsdp2-gpt2-leapfrog".split()


@pytest.mark.parametrize("case", FP32_CASES)
def test_gradients_after_one_step_equal_single_process(grads, case):
    # Global batch of 4 split over 2 ranks vs the whole batch in one process; every parameter.
    assert grads[case]["max_abs"] <= 1e-6, grads[case]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_gradient_accumulation_without_sync(grads, mode):
    # Two micro-batches per rank, the first inside gradient_sync(model, False).
    r = grads[f"{mode}-llama-midpoint-no_sync"]
    assert r["max_abs"] <= 1e-6, r


def test_fsdp2_bf16_mixed_precision_close_to_fp32(grads):
    # bf16 parameters for compute, fp32 reduction: bf16-sized differences, not wrong gradients.
    r = grads["fsdp2-llama-hamiltonian-bf16"]
    assert 0 < r["max_rel"] <= 5e-2, r


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_process_training_checkpoints_and_resumes(training, mode):
    r = training[mode]
    assert r["step"] == 2
    assert r["resumed"] == r["rest"]  # identical continuation from the DCP checkpoint
    assert r["param_max_abs"] == 0.0  # and identical weights at the end
    assert r["first"][0] != r["rest"][-1]  # it did train


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_process_dcp_checkpoint_reloads_in_one_process(training, mode):
    """README: sharded checkpoints reload at another world size. The 2-process run's step-2 checkpoint
    (model and AdamW state; FSDP2 shards or DDP replicas) is loaded by this single process into a
    differently initialised model, which replays steps 2-4 on the whole global batch: the losses equal the
    2-process continuation's (step 2 checks the weights, steps 3-4 the optimizer state)."""
    torch.manual_seed(7)
    ids = torch.randint(0, 97, (5, 4, 12))  # dist_worker.train's batches
    model = tiny_model(seed=99, block="llama", dynamics="hamiltonian", layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert load_sharded(training["dir"] / "ckpt" / mode, model, opt) == {"step": 2}
    losses = []
    for s in range(2, 5):
        loss = model(ids[s], labels=ids[s]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses == pytest.approx(training[mode]["rest"], rel=1e-5, abs=0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_finetune_under_torchrun_matches_one_process(training, token_dir, tmp_path, mode):
    # revllm.convert.finetune.finetune on 2 processes x 2 rows vs 1 process x 4 rows (same global batch).
    from dist_worker import FINETUNE, finetune_model

    import revllm
    from revllm.convert.finetune import finetune

    ref = finetune(finetune_model(), token_dir, tmp_path / "ft", **dict(FINETUNE, batch_size=4))["model"].state_dict()
    two = revllm.RevLLMForCausalLM.from_pretrained(training["dir"] / "ckpt" / f"ft-{mode}" / "model").state_dict()
    assert two.keys() == ref.keys()
    assert max((two[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5


@pytest.mark.parametrize("lora", [0, 2])
def test_fixed_point_distillation_runs_under_ddp(training, lora):
    # Full fine-tuning failed at the first backward (layer 0's parameters marked ready twice); with LoRA the
    # hidden-state term could not find the final norm through DDP(PeftModel).
    run = training["dir"] / "ckpt" / f"ft-ddp-fixed_point-lora{lora}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and (run / "model" / "config.json").is_file()


@pytest.mark.slow
def test_deepspeed_zero_gradients_equal_single_process(tmp_path):
    # Optional: DeepSpeed's own engine (not through accelerate, which runs DeepSpeed only on GPUs).
    pytest.importorskip("deepspeed")
    # The first run JIT-builds DeepSpeed's CPU communication op (ninja + a C++ compiler): minutes on 2 cores.
    _torchrun("deepspeed", tmp_path / "ds.json", env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    results = json.loads((tmp_path / "ds.json").read_text())
    assert len(results) == 6
    for case, r in results.items():
        assert not r["missing"] and r["max_abs"] <= 1e-6, (case, r)


# -- single process: checkpoint safety and argument errors --------------------------------------
def test_sharded_checkpoint_refuses_corruption(tmp_path):
    model = tiny_model()
    save_sharded(tmp_path / "ck", model, state={"step": 3})
    other = tiny_model(seed=5)
    assert load_sharded(tmp_path / "ck", other) == {"step": 3}
    for n, p in model.state_dict().items():
        assert torch.equal(p, other.state_dict()[n]), n
    shard = next((tmp_path / "ck").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_sharded(tmp_path / "ck", other)
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a complete"):
        load_sharded(tmp_path / "half", other)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_reader_never_unpickles_arbitrary_objects(tmp_path):
    save_sharded(tmp_path / "ck", tiny_model())
    assert SafeFileSystemReader(str(tmp_path / "ck")).read_metadata().state_dict_metadata  # real metadata loads
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        SafeFileSystemReader(str(tmp_path / "ck")).read_metadata()


def test_parallelize_rejects_bad_arguments():
    with pytest.raises(RevLLMError, match="unknown"):
        parallelize(tiny_model(), "zero3")
    with pytest.raises(RevLLMError, match="ignored"):
        parallelize(tiny_model(), "ddp", mp_policy="bf16")
    with pytest.raises(RevLLMError, match="torchrun"):
        parallelize(tiny_model(), "fsdp2")


# -- `revllm train` under torchrun (the issue-3 loop, unchanged launch) -------------------------
def _revllm_train(nproc, *args):
    _revllm(nproc, "train", *args)


def _revllm(nproc, command, *args):
    cmd = [sys.executable, "-m", "revllm.cli", command, *map(str, args)]
    if nproc > 1:
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
            command,
            *map(str, args),
        ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"revllm {command} ({nproc} processes) hung for more than {TIMEOUT_S} s")
    assert proc.returncode == 0, out[-4000:]


def _rows(run):
    import csv

    with open(run / "metrics.csv") as f:
        return [{k: r[k] for k in ("step", "tokens", "lr", "train_loss", "val_loss")} for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_revllm_train_under_torchrun_matches_one_process_and_resumes(tmp_path, token_dir, mode):
    from pipeline_fixtures import tiny_train_config  # noqa: F811

    from revllm.io import load_model
    from revllm.train import train

    common = ["--data", token_dir, *DIST, "--parallel", mode]
    run = tmp_path / "run"
    _revllm_train(2, *common, "--out", run)
    full = _rows(run)
    # One process, batch 4 = the same global batch (the sampler draws it whole; each rank takes 2 rows).
    one = train(
        tiny_train_config(
            token_dir,
            tmp_path / "one",
            dynamics="hamiltonian",
            batch_size=4,
            max_steps=4,
            eval_interval=2,
            checkpoint_interval=2,
        )
    )
    one_rows = _rows(tmp_path / "one")
    assert [r["tokens"] for r in full] == [r["tokens"] for r in one_rows]
    for a, b in zip(full, one_rows):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= 1e-5, (a, b)
    w2, w1 = load_model(run).state_dict(), load_model(tmp_path / "one").state_dict()
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) <= 1e-5
    assert one["steps"] == 4
    # Resume from step 2 (the step-4 checkpoint is removed): identical rows and weights.
    final = w2
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000004")
    _revllm_train(2, *common, "--out", run, "--resume")
    assert _rows(run) == full
    resumed = load_model(run).state_dict()
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_revllm_convert_distill_under_torchrun(tmp_path):
    """`revllm convert SRC OUT --distill DATA` on 2 processes exits 0 on both: rank 0 alone writes OUT
    (rank 1 used to try as well and failed on the existing OUT)."""
    from hf_tiny import tiny_hf
    from test_convert import _token_dir

    tiny_hf("gpt2", dtype=torch.float32).save_pretrained(tmp_path / "hf")
    data = _token_dir(tmp_path / "tok")
    _revllm(
        2,
        "convert",
        tmp_path / "hf",
        tmp_path / "out",
        "--distill",
        data,
        "--steps",
        2,
        "--batch-size",
        2,
        "--seq-len",
        16,
        "--eval-interval",
        2,
        "--checkpoint-interval",
        2,
        "--warmup",
        0,
        "--no-progress",
    )
    assert json.loads((tmp_path / "out" / "conversion_report.json").read_text())["distill"]["steps"] == 2
