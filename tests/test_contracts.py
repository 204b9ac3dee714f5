"""README claims that had no test: the CLI's one-line / exit-2 contract (as a subprocess, whole stderr),
NaN / inf loss, the caller's RNG stream across a dropout replay, checkpoints with a missing file, the
conversion refusals, and FSDP2 on a model sharded elsewhere / with LoRA (single-process gloo group)."""

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from pipeline_fixtures import corpus_dir, tiny_tokenizer, tiny_train_config, token_dir, train_tokenizer  # noqa: F401

from revllm import io as rio
from revllm.errors import CheckpointError, RevLLMError

ROOT = Path(__file__).resolve().parents[1]
TINY = "--layers 2 --hidden 32 --heads 4 --kv-heads 2 --seq-len 32 --batch-size 4 --warmup 1 --lr 3e-3 --eval-iters 1 --eval-interval 100 --loss-chunk-size 32 --no-progress".split()


def _env():
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )


def _run(args, code=None, preexec_fn=None):
    """``revllm ARGS`` in a fresh interpreter; ``code`` runs first (to inject a fault)."""
    prog = (code or "") + "\nimport sys\nfrom revllm.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", prog, *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        preexec_fn=preexec_fn,
        cwd=ROOT,
    )


def _one_line(r, command, *needles):
    """The whole of stderr is exactly one line ``revllm COMMAND: error: ...`` naming the problem; exit 2."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"revllm {command}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- CLI contract -------------------------------------------------------------------------------------
def test_cli_binary_input_is_one_line_exit_2(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    r = _run(["data", binary, "--out", tmp_path / "tok", "--no-progress"])
    _one_line(r, "data", str(binary), "looks binary")
    assert not (tmp_path / "tok").exists()


def test_cli_foreign_tokenizer_is_one_line_exit_2(tmp_path, token_dir, corpus_dir):
    from revllm.data import prepare_tokens

    prepare_tokens(
        [corpus_dir],
        tmp_path / "other",
        tokenizer=str(train_tokenizer(tmp_path / "bpe2", 250, seed=1)),
        val_fraction=0.1,
        progress=False,
    )
    run = tmp_path / "run"
    r = _run(["train", "--data", token_dir, "--out", run, "--max-steps", 1, "--checkpoint-interval", 1, *TINY])
    assert r.returncode == 0, r.stderr[-3000:]
    before = sorted(p.name for p in rio.list_checkpoints(run))
    r = _run(["train", "--out", run, "--resume", "--data", tmp_path / "other", "--max-steps", 2, "--no-progress"])
    _one_line(r, "train", "tokenizer")
    assert sorted(p.name for p in rio.list_checkpoints(run)) == before  # nothing written, nothing lost


# Multiply the training loss by VALUE from the third training forward on (evaluation untouched).
_FAULT = textwrap.dedent("""
    import revllm.train.loop as loop
    _orig, _n = loop.causal_lm_loss, [0]
    def _faulty(model, batch):
        loss, m = _orig(model, batch)
        _n[0] += model.training
        return (loss * float({value!r}) if model.training and _n[0] >= 3 else loss), m
    loop.causal_lm_loss = _faulty
""")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_cli_non_finite_loss_is_one_line_exit_2_and_keeps_the_checkpoint(tmp_path, token_dir, value):
    run = tmp_path / "run"
    r = _run(
        ["train", "--data", token_dir, "--out", run, "--max-steps", 5, "--checkpoint-interval", 2, *TINY],
        code=_FAULT.format(value=value),
    )
    _one_line(r, "train", f"loss is {value} at step 3", "step_00000002")
    ckpts = rio.list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_00000002"]
    rio.verify(ckpts[0])


def _limit_file_size():
    # Files above 64 KiB cannot be written: the token files (read only) and the logs fit, a checkpoint does
    # not. Python ignores SIGXFSZ, so the write fails with EFBIG as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_cli_full_disk_is_one_line_exit_2(tmp_path, token_dir):
    run = tmp_path / "run"
    r = _run(
        ["train", "--data", token_dir, "--out", run, "--max-steps", 2, "--checkpoint-interval", 1, *TINY],
        preexec_fn=_limit_file_size,
    )
    _one_line(r, "train")
    assert rio.list_checkpoints(run) == []  # no half-written checkpoint left behind


def test_inf_loss_stops_training_and_names_the_last_good_checkpoint(tmp_path, token_dir):
    from revllm.train import train
    from revllm.train.loop import causal_lm_loss

    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += model.training
        loss, m = causal_lm_loss(model, batch)
        return (loss * float("inf") if calls["n"] == 5 and model.training else loss), m

    run = tmp_path / "run"
    with pytest.raises(RevLLMError, match=r"loss is inf at step 5.*step_00000003"):
        train(tiny_train_config(token_dir, run), loss_fn=loss_fn)
    assert [p.name for p in rio.list_checkpoints(run)] == ["step_00000003"]


# -- engine: the caller's RNG stream ------------------------------------------------------------------
@pytest.mark.parametrize("dynamics", ["midpoint", "hamiltonian"])
def test_dropout_replay_leaves_the_callers_rng_stream_untouched(dynamics):
    """The backward replays each layer's dropout masks by restoring the forward's generator state; it
    must hand the caller's stream back as it found it (README: RNG replay inside fork_rng)."""
    model = tiny_model(dynamics=dynamics, dropout=0.2, layers=3, dtype=torch.float64).train()
    ids = torch.randint(0, 97, (2, 12))
    loss = model(ids, labels=ids).loss
    before = torch.get_rng_state()
    expected = torch.rand(8, dtype=torch.float64)  # what the caller's next draw is without the backward
    torch.set_rng_state(before)
    loss.backward()
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(8, dtype=torch.float64), expected)


# -- checkpoints: a file listed in the manifest is missing ---------------------------------------------
def _fake_checkpoint(root: Path) -> Path:
    ck = root / "checkpoints" / "step_00000001"
    (ck / "model").mkdir(parents=True)
    (ck / "model" / "model.safetensors").write_bytes(b"weights")
    (ck / "trainer_state.json").write_text("{}")
    rio.write_manifest(ck)
    return ck


def test_checkpoint_with_a_listed_file_missing_is_refused(tmp_path, capsys):
    ck = _fake_checkpoint(tmp_path)
    assert rio.verify(ck) == ck
    (ck / "model" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model/model.safetensors is missing"):
        rio.verify(ck)
    assert rio.latest_good(tmp_path) is None
    assert "checkpoint step_00000001 is corrupted" in capsys.readouterr().err


def test_checkpoint_whose_manifest_lists_nothing_or_leaves_a_file_out_is_refused(tmp_path):
    ck = _fake_checkpoint(tmp_path)
    (ck / "model" / "extra.json").write_text("{}")  # a file the manifest does not cover
    with pytest.raises(CheckpointError, match=r"model/extra.json is not in its manifest"):
        rio.verify(ck)
    (ck / "model" / "extra.json").unlink()
    (ck / "manifest.json").write_text("{}")  # an empty manifest vouches for nothing
    with pytest.raises(CheckpointError, match="lists no files"):
        rio.verify(ck)


def test_sharded_checkpoint_with_a_listed_file_missing_is_refused(tmp_path):
    from revllm.parallel import load_sharded, save_sharded

    save_sharded(tmp_path / "ck", tiny_model(), state={"step": 1})
    shard = next((tmp_path / "ck").glob("*.distcp"))
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"is missing"):
        load_sharded(tmp_path / "ck", tiny_model(seed=2))


def test_sharded_checkpoint_saved_again_replaces_the_old_one(tmp_path):
    """Saving over an existing sharded checkpoint replaces it whole; a stale ``.tmp`` left by an
    interrupted save is discarded, not shipped; nothing but the checkpoint is left beside it."""
    from revllm.parallel import load_sharded, save_sharded

    (tmp_path / "ck.tmp").mkdir()
    (tmp_path / "ck.tmp" / "stale.distcp").write_bytes(b"from an interrupted save")
    save_sharded(tmp_path / "ck", tiny_model(seed=0), state={"step": 1})
    newer = tiny_model(seed=1)
    save_sharded(tmp_path / "ck", newer, state={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert not (tmp_path / "ck" / "stale.distcp").exists()
    other = tiny_model(seed=2)
    assert load_sharded(tmp_path / "ck", other) == {"step": 2}
    for n, t in newer.state_dict().items():
        assert torch.equal(other.state_dict()[n], t), n


def _adam_step(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    return opt


def test_sharded_checkpoint_round_trips_model_and_optimizer(tmp_path):
    from revllm.parallel import load_sharded, save_sharded

    model = tiny_model(seed=0)
    opt = _adam_step(model)
    save_sharded(tmp_path / "ck", model, opt, state={"step": 1})
    other = tiny_model(seed=1)
    opt2 = _adam_step(other)  # a different state, to be overwritten
    assert load_sharded(tmp_path / "ck", other, opt2) == {"step": 1}
    for n, t in model.state_dict().items():
        assert torch.equal(other.state_dict()[n], t), n
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys() and len(a) == len(list(model.parameters()))
    for k in a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[k][name], b[k][name]), (k, name)


def test_sharded_checkpoint_of_another_architecture_is_a_checkpoint_error(tmp_path):
    from revllm.parallel import load_sharded, save_sharded

    save_sharded(tmp_path / "ck", tiny_model(layers=2))
    with pytest.raises(CheckpointError, match=r"cannot load sharded checkpoint .*ck: "):
        load_sharded(tmp_path / "ck", tiny_model(layers=3))


# -- conversion refusals ------------------------------------------------------------------------------
def _llama_cfg(**kw):
    import transformers as t

    return t.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=97,
        **kw,
    )


@pytest.mark.parametrize("case", ["rope_scaling", "sliding_window", "mlp_bias"])
def test_conversion_refuses_unsupported_features(case):
    import transformers as t

    from revllm.convert.from_hf import translate_config

    cfg, msg = {
        "rope_scaling": (
            _llama_cfg(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
            "RoPE scaling",
        ),
        "sliding_window": (
            t.Qwen2Config(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                vocab_size=97,
                use_sliding_window=True,
                sliding_window=8,
            ),
            "sliding-window",
        ),
        "mlp_bias": (_llama_cfg(mlp_bias=True), "mlp_bias=True"),
    }[case]
    with pytest.raises(RevLLMError, match=msg):
        translate_config(cfg, dynamics="euler")
    translate_config(_llama_cfg(), dynamics="euler")  # the same config without the feature converts


@pytest.mark.parametrize("case", ["unexpected", "missing"])
def test_conversion_refuses_a_weight_it_cannot_place(case):
    from hf_tiny import tiny_hf

    from revllm.convert import from_hf

    src = tiny_hf("llama", layers=2, dtype=torch.float32)
    if case == "unexpected":
        src.model.layers[0].register_parameter("extra_gain", torch.nn.Parameter(torch.ones(32)))
    else:
        src.model.layers[1].mlp.down_proj = torch.nn.Linear(64, 32, bias=True)  # bias the blocks do not have
    with pytest.raises(RevLLMError, match="weight copy failed: .*unexpected .*model.layers"):
        from_hf.convert(src, dynamics="euler", initial_state="copy")


# -- FSDP2 on one process (gloo, world size 1) ---------------------------------------------------------
@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_refuses_a_lora_model(one_process_group):
    from peft import LoraConfig, get_peft_model

    from revllm.parallel import parallelize

    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(RevLLMError, match="fsdp2 does not support LoRA"):
        parallelize(peft_model, "fsdp2")


def test_recompute_hooks_on_a_model_sharded_elsewhere(one_process_group):
    """``fully_shard`` applied by someone else (as accelerate's plugin does), then
    ``install_fsdp2_recompute_hooks``: every Hamiltonian gradient exists and equals the unsharded one.
    Without the hooks half of each layer's gradients stay None (checked, so the hooks are what fixes it)."""
    from torch.distributed.fsdp import fully_shard

    from revllm.parallel import install_fsdp2_recompute_hooks

    ids = torch.randint(0, 97, (2, 10))
    ref = tiny_model(dynamics="hamiltonian", layers=2)
    ref(ids, labels=ids).loss.backward()
    grads = {}
    for hooks in (False, True):
        model = tiny_model(dynamics="hamiltonian", layers=2)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        if hooks:
            assert install_fsdp2_recompute_hooks(model) == 2
            assert install_fsdp2_recompute_hooks(model) == 2  # idempotent: no second hook
        model(ids, labels=ids).loss.backward()
        grads[hooks] = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is None for g in grads[False].values())
    for n, p in ref.named_parameters():
        g = grads[True][n]
        assert g is not None, n
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7), n


# -- what a user names as a model ---------------------------------------------------------------------
def test_resolve_model_dir_names(tmp_path, monkeypatch, capsys):
    import revllm.io

    monkeypatch.setattr(revllm.io, "smollm2_model_dir", lambda: tmp_path / "cached-smollm2")
    assert rio.resolve_model_dir("smollm2") == tmp_path / "cached-smollm2"
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        rio.resolve_model_dir(tmp_path / "nowhere")
    ck = _fake_checkpoint(tmp_path / "run")
    assert rio.resolve_model_dir(ck) == ck / "model"  # a checkpoint: verified, its model/
    copied = tmp_path / "renamed"
    import shutil

    shutil.copytree(ck, copied)  # a checkpoint under another name is still recognised by its manifest
    assert rio.resolve_model_dir(copied) == copied / "model"
    (ck / "manifest.json").unlink()  # a step_ directory without its manifest is refused, not read
    with pytest.raises(CheckpointError, match="incomplete"):
        rio.resolve_model_dir(ck)
    run = tmp_path / "run"  # its only checkpoint is now bad
    with pytest.raises(CheckpointError, match=f"run {run} has no good checkpoint"):
        rio.resolve_model_dir(run)
    assert "checkpoint step_00000001 is corrupted" in capsys.readouterr().err
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")  # a finished fine-tuning run: RUN/model
    assert rio.resolve_model_dir(run) == run / "model"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert rio.resolve_model_dir(tmp_path / "hf") == tmp_path / "hf"
    with pytest.raises(RevLLMError, match=r"is not a run directory, a checkpoint or a Hugging Face model directory"):
        rio.resolve_model_dir(tmp_path / "run" / "checkpoints")


# -- drift monitor: fallback only above the threshold; the per-layer figure is logged ------------------
def test_drift_fallback_only_above_its_threshold_and_per_layer_max_logged(caplog):
    import logging

    from test_exact import _drift

    with caplog.at_level(logging.DEBUG, logger="revllm.drift"):
        model = _drift(False, drift_threshold=1.0, drift_fallback=True)  # bf16 drift ~1e-3: far below 1.0
    mon = model.drift_monitor
    assert mon.fallbacks == 0 and 0 < max(mon.last_per_layer) < 1.0
    assert f"per-layer reconstruction drift: max {max(mon.last_per_layer):.3g}" in caplog.text
