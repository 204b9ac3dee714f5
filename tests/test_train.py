"""The training loop: checkpoints (atomic, verified, exact resume), bad states, config handling."""

import math
import shutil

import pytest
import torch
from pipeline_fixtures import corpus_dir, tiny_tokenizer, tiny_train_config, token_dir, train_tokenizer  # noqa: F401

from revllm import io as rio
from revllm.errors import CheckpointError, RevLLMError
from revllm.io import load_model
from revllm.train import build_config, causal_lm_loss, train
from revllm.train import checkpoint as ckpt_io


def _weights(path):
    return load_model(path).state_dict()


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_writes_run(tmp_path, token_dir):
    s = train(tiny_train_config(token_dir, tmp_path / "run", keep_last=1))
    run = tmp_path / "run"
    # A uniform guess over the 300-token vocabulary scores ln 300 = 5.70 (where the untrained model starts);
    # 6 steps reach ~5.2. 0.3 below uniform: a model that did not learn (or a broken loss) cannot pass.
    assert s["steps"] == 6 and s["val_loss"] < math.log(300) - 0.3 and s["memory_free"]
    assert [p.name for p in rio.list_checkpoints(run)] == ["step_00000006"]  # keep_last=1
    assert (run / "metrics.csv").read_text().count("\n") == 7 and (run / "tb").is_dir()
    for k in ("tokens_per_s", "activation_mb", "peak_mb", "params"):
        assert s[k] > 0
    # the checkpoint's model dir is a plain HF dir with the tokenizer
    assert (run / "checkpoints/step_00000006/model/tokenizer.json").is_file()
    assert load_model(run).config.dynamics == "midpoint"


def test_memory_free_saves_less_than_stored(tmp_path, token_dir):
    rev = train(tiny_train_config(token_dir, tmp_path / "rev", layers=4, max_steps=1, eval_iters=1))
    std = train(tiny_train_config(token_dir, tmp_path / "std", layers=4, max_steps=1, eval_iters=1, dynamics="euler"))
    assert not std["memory_free"]
    assert rev["activation_mb"] * 3 < std["activation_mb"]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_bit_identical(tmp_path, token_dir, dropout):
    """Train 6 steps straight vs 3 steps + resume: identical weights (CPU; dropout replays the RNG)."""
    full = tmp_path / "full"
    train(tiny_train_config(token_dir, full, dropout=dropout))
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints/step_00000003", part / "checkpoints/step_00000003")
    s = train(tiny_train_config(token_dir, part, resume=True), explicit={"resume", "out"})
    assert s["steps"] == 6
    _assert_same(_weights(part), _weights(full))
    # the CSV keeps one row per step: rows after the checkpoint were dropped before resuming
    steps = [ln.split(",")[0] for ln in (full / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(1, 7)]


def test_run_stopped_by_stop_after_resumes_to_max_steps(tmp_path, token_dir):
    """stop_after (like max_time) limits one invocation: a plain --resume runs on to max_steps, and the
    result equals the uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_train_config(token_dir, full))
    assert train(tiny_train_config(token_dir, part, stop_after=2))["steps"] == 2
    s = train(tiny_train_config(token_dir, part, resume=True), explicit={"resume", "out"})
    assert s["steps"] == 6
    _assert_same(_weights(part), _weights(full))


def test_corrupted_checkpoint_refused_and_skipped(tmp_path, token_dir, capsys):
    run = tmp_path / "run"
    train(tiny_train_config(token_dir, run))
    good, bad = rio.list_checkpoints(run)
    st = bad / "model" / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        rio.verify(bad)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_model(bad)
    capsys.readouterr()
    assert rio.latest_good(run) == good
    # one plain line (no warning category, no source path)
    assert capsys.readouterr().err == (
        "checkpoint step_00000006 is corrupted (model/model.safetensors does not match "
        "its sha256); resuming from step_00000003\n"
    )
    with open(good / "trainer_state.safetensors", "r+b") as f:  # truncated
        f.truncate(100)
    with pytest.raises(RevLLMError, match="no good checkpoint"):
        train(tiny_train_config(token_dir, run, resume=True), explicit={"resume"})
    assert "no good checkpoint is left" in capsys.readouterr().err
    (tmp_path / "empty" / "checkpoints" / "step_00000001").mkdir(parents=True)  # no manifest: incomplete
    with pytest.raises(CheckpointError, match="incomplete"):
        rio.verify(tmp_path / "empty" / "checkpoints" / "step_00000001")


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, token_dir):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += model.training  # evaluation calls it too
        loss, m = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 5 and model.training else loss), m

    run = tmp_path / "run"
    with pytest.raises(RevLLMError, match=r"loss is nan at step 5.*step_00000003"):
        train(tiny_train_config(token_dir, run), loss_fn=loss_fn)
    assert [p.name for p in rio.list_checkpoints(run)] == ["step_00000003"]
    rio.verify(rio.list_checkpoints(run)[0])


def test_disk_full_keeps_previous_checkpoint(tmp_path, token_dir, monkeypatch):
    import errno

    real = ckpt_io.save_file
    calls = {"n": 0}

    def full_disk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ckpt_io, "save_file", full_disk)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="No space left on device.*untouched"):
        train(tiny_train_config(token_dir, run, keep_last=1))
    ckpts = rio.list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_00000003"]
    rio.verify(ckpts[0])
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_config_yaml_flags_and_errors(tmp_path, token_dir):
    y = tmp_path / "c.yaml"
    y.write_text("layers: 3\nseq-len: 16\nlr: 0.01\n")
    cfg = build_config(y, {"lr": 0.02, "layers": None})
    assert (cfg.layers, cfg.seq_len, cfg.lr) == (3, 16, 0.02)
    y.write_text("layerz: 3\n")
    with pytest.raises(RevLLMError, match="unknown key 'layerz'"):
        build_config(y)
    y.write_text("[1, 2\n")
    with pytest.raises(RevLLMError, match="not valid YAML"):
        build_config(y)
    bad = [
        dict(dynamics="rk4"),
        dict(hidden=30),
        dict(seq_len=64, max_positions=32),
        dict(seq_len=10_000),
        dict(batch_size=0),
        dict(precision="bf16"),
        dict(seq_len=1),
    ]
    msgs = [
        "dynamics='rk4' is unknown",
        "must divide hidden_size=30",
        "exceeds max_positions",
        "val.bin has",
        "batch_size=0",
        "needs a GPU",
        "seq_len=1 must be >= 2",
    ]
    for kw, msg in zip(bad, msgs):
        with pytest.raises((RevLLMError, ValueError), match=msg):
            train(tiny_train_config(token_dir, tmp_path / "r", **kw))


def test_init_from_tokenizer_and_vocab_mismatch(tmp_path, token_dir):
    run = tmp_path / "run"
    train(tiny_train_config(token_dir, run, max_steps=1))
    s = train(tiny_train_config(token_dir, tmp_path / "ft", init_from=str(run), max_steps=2))  # same tokenizer: fine
    assert s["steps"] == 2
    other = tmp_path / "other_model"
    shutil.copytree(rio.resolve_model_dir(run), other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    train_tokenizer(tmp_path / "tok2", vocab_size=280, seed=9)
    for f in (tmp_path / "tok2").iterdir():
        shutil.copy(f, other / f.name)
    with pytest.raises(RevLLMError, match=f"different tokenizer .* than the model's \\('{other}'\\)"):
        train(tiny_train_config(token_dir, tmp_path / "ft2", init_from=str(other)))
    import revllm

    small = revllm.RevLLMForCausalLM(
        revllm.RevLLMConfig(
            num_hidden_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=50, max_position_embeddings=64
        )
    )
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(RevLLMError, match="vocabulary"):
        train(tiny_train_config(token_dir, tmp_path / "ft3", init_from=str(tmp_path / "small")))


def test_resume_refuses_architecture_change(tmp_path, token_dir, corpus_dir):
    run = tmp_path / "run"
    train(tiny_train_config(token_dir, run, max_steps=3))
    with pytest.raises(RevLLMError, match="already holds checkpoints"):  # never overwrite a run by accident
        train(tiny_train_config(token_dir, run, max_steps=3))
    with pytest.raises(RevLLMError, match="layers cannot change"):
        train(tiny_train_config(token_dir, run, resume=True, layers=5), explicit={"resume", "layers"})
    s = train(tiny_train_config(token_dir, run, resume=True, max_steps=5), explicit={"resume", "max_steps"})
    assert s["steps"] == 5
    from revllm.data import prepare_tokens

    tok2 = train_tokenizer(tmp_path / "tok2", vocab_size=280, seed=9)
    prepare_tokens([corpus_dir], tmp_path / "data2", str(tok2), val_fraction=0.1, progress=False)
    with pytest.raises(RevLLMError, match="made with tokenizer"):  # other token files on resume
        train(
            tiny_train_config(tmp_path / "data2", run, resume=True, max_steps=6),
            explicit={"resume", "max_steps", "data"},
        )


def test_custom_loss_fn_and_teacher(tmp_path, token_dir):
    """The interface distillation builds on: loss_fn(model, batch) -> (loss, metrics); teacher is placed."""
    import revllm

    teacher = revllm.RevLLMForCausalLM(
        revllm.RevLLMConfig(
            num_hidden_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=300, max_position_embeddings=64
        )
    )
    seen = []

    def kd(model, batch):
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"]).logits
        s = model(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
        seen.append(batch["input_ids"].shape)
        return loss, {}

    s = train(tiny_train_config(token_dir, tmp_path / "kd", max_steps=2), loss_fn=kd, teacher=teacher)
    assert s["steps"] == 2 and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert seen[0] == (4, 32)


def test_keep_last_never_prunes_good_checkpoints_for_a_newer_corrupted_one(tmp_path, token_dir, capsys):
    run = tmp_path / "run"
    train(tiny_train_config(token_dir, run))  # checkpoints 3 and 6
    bad = run / "checkpoints" / "step_00000006" / "model" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:64])  # corrupted: resume continues from step 3
    train(
        tiny_train_config(token_dir, run, resume=True, checkpoint_interval=1, keep_last=1, stop_after=4),
        explicit={"resume", "out", "checkpoint_interval", "keep_last", "stop_after"},
    )
    assert "checkpoint step_00000006 is corrupted" in capsys.readouterr().err
    assert rio.latest_good(run).name == "step_00000004"
    assert "resuming from step_00000004" in capsys.readouterr().err


def test_yaml_numbers_and_limits_are_checked(tmp_path, token_dir):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 3e-3\nmin_lr: 1e-4\n")  # PyYAML reads these as strings
    cfg = build_config(y, overrides={"data": str(token_dir), "out": str(tmp_path / "r")}).validate()
    assert cfg.lr == 3e-3 and cfg.min_lr == 1e-4
    y.write_text("lr: fast\n")
    with pytest.raises(RevLLMError, match="lr='fast' must be a number"):
        build_config(y)
    for bad, msg in (
        ({"stop_after": 0}, "stop_after=0 must be a step >= 1"),
        ({"max_time": -5.0}, "max_time=-5.0 must be > 0"),
    ):
        with pytest.raises(RevLLMError, match=msg):
            tiny_train_config(token_dir, tmp_path / "r", **bad).validate()


def test_init_from_refuses_architecture_flags_and_records_the_models_own(tmp_path, token_dir):
    src = tmp_path / "src"
    train(tiny_train_config(token_dir, src, max_steps=1, dynamics="euler", layers=3))
    with pytest.raises(RevLLMError, match="drop --dynamics, --layers"):
        train(
            tiny_train_config(token_dir, tmp_path / "a", init_from=str(src), dynamics="leapfrog", layers=8),
            explicit={"init_from", "dynamics", "layers"},
        )
    s = train(tiny_train_config(token_dir, tmp_path / "b", init_from=str(src), max_steps=1))  # cfg default: midpoint
    assert s["dynamics"] == "euler" and s["config"]["layers"] == 3


def test_loss_fn_metric_names_get_csv_columns(tmp_path, token_dir):
    class WithKL:
        metric_names = ("kl",)

        def __call__(self, model, batch):
            loss, _ = causal_lm_loss(model, batch)
            return loss, {"kl": 0.25}

    run = tmp_path / "run"
    train(tiny_train_config(token_dir, run, max_steps=2), loss_fn=WithKL())
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].endswith(",kl") and all(ln.endswith(",0.25") for ln in lines[1:])


def test_evaluation_loss_builds_no_full_logits():
    """The loop's loss under no_grad (its evaluation) asks a RevLLM model for one logit position, so the
    (B, T, V) logits are never built; the loss is the same. An HF model (wrapped in peft, whose base model
    is what is checked) computes its loss from its own logits and gets the call unchanged."""
    from conftest import tiny_model

    model = tiny_model()
    ids = torch.randint(0, 97, (2, 12))
    widths = []
    model.lm_head.register_forward_hook(lambda m, i, o: widths.append(o.shape[1]))
    with torch.no_grad():
        loss, _ = causal_lm_loss(model, {"input_ids": ids})
        ref = model(input_ids=ids, labels=ids)
    assert widths == [1, 12]  # ours: one position; a plain call: every position
    assert torch.equal(loss, ref.loss)

    from hf_tiny import tiny_hf
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(tiny_hf("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        loss, _ = causal_lm_loss(hf, {"input_ids": ids})
        torch.testing.assert_close(loss, hf(input_ids=ids, labels=ids).loss, rtol=0, atol=0)
