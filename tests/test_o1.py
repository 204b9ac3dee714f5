"""Issue 14: the O(1)-memory conversion recipe (calibration, per-layer distillation, CLI, resume, bad input)."""

import json

import pytest
import torch
from hf_tiny import tiny_hf
from test_convert import _token_dir

from revllm.convert import convert
from revllm.convert.o1 import (
    O1DistillLoss,
    ProgressiveConversion,
    auto_hard_layers,
    calibrate,
    check_tokens_match,
    parse_hard_layers,
    recipe_state,
)
from revllm.errors import RevLLMError


def _ids(B=2, T=16, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def test_teacher_states_align_with_the_students_layers():
    """A student equal to the teacher (euler) has zero per-layer error at every layer: the teacher state
    matched after layer j is the student's newest stream after layer j. A rule that differs has a nonzero one."""
    src = tiny_hf("llama", dtype=torch.float64)
    ids = {"input_ids": _ids()}
    same = O1DistillLoss(src, layer_weight=1.0, layer_weight_end=1.0)
    _, met = same(convert(src, dynamics="euler", dtype=torch.float64).train(), ids)
    assert met["layer_err"] < 1e-12 and met["kl"] < 1e-10  # (HF computes RoPE tables in fp32)
    _, met = same(convert(src, dynamics="leapfrog", dtype=torch.float64).train(), ids)
    assert met["layer_err"] > 1e-4


def test_layer_weight_schedule_and_its_gradient():
    src = tiny_hf("llama", dtype=torch.float64)
    loss = O1DistillLoss(src, layer_weight=2.0, layer_weight_end=0.0, steps=4)
    assert [loss.weight_at(s) for s in (0, 1, 2, 4, 9)] == [2.0, 1.5, 1.0, 0.0, 0.0]
    student = convert(src, dynamics="midpoint", dtype=torch.float64).train()
    total, met = loss(student, {"input_ids": _ids()})
    assert met["layer_weight"] == 2.0
    assert abs(total.item() - (met["kl"] + 2.0 * met["layer_err"])) < 1e-9
    total.backward()  # through the memory-free backward
    assert all(p.grad is not None for p in student.model.layers.parameters())
    student.eval()
    loss(student, {"input_ids": _ids()})  # evaluation does not advance the schedule
    assert loss.calls == 1


def test_progressive_schedule_switches_every_layer_but_the_hard_ones_once():
    up = ProgressiveConversion(6, hard=[2], steps=10)
    seen = [up.pending(s) for s in range(12)]
    assert seen[0] == [1, 3, 4, 5] and seen[-3:] == [[], [], []]  # layer 0 switches at once; all by step 9
    assert all(set(b) <= set(a) for a, b in zip(seen, seen[1:]))  # a switched layer never switches back
    assert seen[4] == [4, 5]  # bottom-up: ceil(5 * 5 / 10) = 3 layers switched after 5 steps
    assert ProgressiveConversion(6, hard=[2], steps=10, order="down").pending(4) == [0, 1]
    assert ProgressiveConversion(6, hard=[], steps=2).pending(0) == [3, 4, 5]  # more layers than steps
    with pytest.raises(RevLLMError, match="'up' or 'down'"):
        ProgressiveConversion(6, hard=[], steps=2, order="sideways")


def test_progressive_student_starts_as_the_teacher_and_ends_with_only_its_hard_layers_stored():
    """With every layer on the residual step the leapfrog student computes the teacher's logits (float64);
    as the loss advances the schedule the layers switch, the student differs, and the loss still trains
    through the memory-free backward with a mix of stored and reversible layers."""
    src = tiny_hf("llama", layers=4, dtype=torch.float64)
    student = convert(src, dynamics="leapfrog", dtype=torch.float64, stored_layers=[1]).train()
    ProgressiveConversion(4, hard=[1], steps=3).apply(student, -1)  # before the first switch: all residual
    with torch.no_grad():
        gap = (student(_ids()).logits - src(_ids()).logits).abs().max()
        assert gap < 1e-6  # the euler conversion's own gap (HF computes RoPE tables in fp32)
        student.dynamics.stored_layers = frozenset([1])
        assert (student(_ids()).logits - src(_ids()).logits).abs().max() > 1e3 * gap
    prog = ProgressiveConversion(4, hard=[1], steps=3)
    loss = O1DistillLoss(src, layer_weight=1.0, layer_weight_end=1.0, steps=3, progressive=prog)
    got = []
    for _ in range(4):
        total, met = loss(student, {"input_ids": _ids()})
        got.append((met["residual_layers"], met["kl"], met["layer_err"]))
        total.backward()
    assert [g[0] for g in got] == [2, 1, 0, 0]  # 3 convertible layers, one switch per step
    assert got[0][2] > 1e-6  # layer 0 switched at the first step already: the student left the teacher
    assert student.dynamics.stored_layers == {1} and student.config.stored_layers == [1]
    assert all(p.grad is not None for p in student.model.layers.parameters())


def test_calibration_finds_a_massive_update_layer():
    src = tiny_hf("llama", layers=6, dtype=torch.float32)
    with torch.no_grad():
        src.model.layers[4].mlp.down_proj.weight.mul_(300.0)
    scores = calibrate(src, [_ids(seed=s) for s in range(2)])
    assert len(scores) == 6 and max(range(6), key=scores.__getitem__) == 4
    assert auto_hard_layers(scores) == [4]
    assert auto_hard_layers([1.0] * 6) == []  # nothing stands out: no hard layer
    assert auto_hard_layers([9.0, 1.0, 8.0, 7.0, 1.0, 1.0], max_layers=2) == [0, 2]


def test_parse_hard_layers():
    assert parse_hard_layers("auto", 30) == "auto"
    assert parse_hard_layers("none", 30) == []
    assert parse_hard_layers("12,11", 30) == [11, 12]
    with pytest.raises(RevLLMError, match=r"names layer 30, but the model's layers are 0\.\.29"):
        parse_hard_layers("11,30", 30)
    with pytest.raises(RevLLMError, match="comma-separated"):
        parse_hard_layers("eleven", 30)


def test_tokenizer_mismatch_is_refused_naming_both(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a"))
    )
    data = _token_dir(tmp_path / "tok")
    meta = json.loads((data / "meta.json").read_text())
    meta["tokenizer"].update(name="other-tokenizer", sha256="0" * 64)
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RevLLMError, match="'other-tokenizer'.*'my-source'"):
        check_tokens_match(data, tok, "my-source")
    from revllm.io import tokenizer_identity

    meta["tokenizer"]["sha256"] = tokenizer_identity(tok, "x")["sha256"]
    (data / "meta.json").write_text(json.dumps(meta))
    check_tokens_match(data, tok, "my-source")  # the same tokenizer passes


def test_o1_run_resumes_exactly_mid_schedule(tmp_path):
    """Stopped at step 2 of 4 (layer weight 1 -> 0: mid-stage) and resumed from RUN/o1.json, the run equals
    the uninterrupted one bit for bit; resuming the schedule from step 0 instead would not."""
    from revllm.convert.finetune import finetune

    data = _token_dir(tmp_path / "tok")
    src = tiny_hf("llama", dtype=torch.float32)
    opts = dict(
        max_steps=4, batch_size=2, seq_len=16, lr=1e-3, warmup=0, eval_interval=4, checkpoint_interval=2, progress=False
    )
    conv = lambda: convert(src, dynamics="leapfrog", stored_layers=[1])  # noqa: E731
    recipe = {"dynamics": "leapfrog", "hard_layers": [1], "layer_weight": 1.0, "layer_weight_end": 0.0, "steps": 4}
    loss = lambda start=0: O1DistillLoss(src, 1.0, 0.0, 4, start)  # noqa: E731
    full = finetune(conv(), data, tmp_path / "full", teacher=src, loss_fn=loss(), **opts)["model"]
    recipe_state(tmp_path / "cut", recipe, resume=False)
    finetune(conv(), data, tmp_path / "cut", teacher=src, loss_fn=loss(), stop_after=2, **opts)
    back, start = recipe_state(tmp_path / "cut", None, resume=True)
    assert back == recipe and start == 2
    resumed = finetune(None, data, tmp_path / "cut", teacher=src, loss_fn=loss(start), resume=True, **opts)["model"]
    assert resumed.config.stored_layers == [1]
    ref = full.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in resumed.state_dict().items())
    # the schedule matters: restarting it at step 0 gives another model
    finetune(conv(), data, tmp_path / "cut0", teacher=src, loss_fn=loss(), stop_after=2, **opts)
    wrong = finetune(None, data, tmp_path / "cut0", teacher=src, loss_fn=loss(0), resume=True, **opts)["model"]
    assert not all(torch.equal(v, ref[k]) for k, v in wrong.state_dict().items())


def _cli(args):
    from revllm.cli import main as cli_main

    return cli_main(args)


def test_cli_convert_memory_o1(tmp_path, capsys):
    src = tiny_hf("llama", dtype=torch.float32)
    src.save_pretrained(tmp_path / "hf")
    data = _token_dir(tmp_path / "tok")
    out = tmp_path / "o1"
    common = [
        "--distill",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--warmup",
        "0",
        "--eval-interval",
        "2",
        "--checkpoint-interval",
        "2",
        "--no-progress",
    ]
    assert _cli(["convert", str(tmp_path / "hf"), str(out), "--memory", "o1", "--hard-layers", "1", *common]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dynamics"] == "leapfrog" and cfg["stored_layers"] == [1] and cfg["memory_free"] is True
    rep = json.loads((out / "conversion_report.json").read_text())
    assert rep["memory"] == "o1" and rep["o1"]["hard_layers"] == [1]
    assert json.loads((tmp_path / "o1.run" / "o1.json").read_text())["hard_layers"] == [1]
    # auto: calibrated on DATA (nothing stands out in a random tiny model)
    assert (
        _cli(
            [
                "convert",
                str(tmp_path / "hf"),
                str(tmp_path / "auto"),
                "--memory",
                "o1",
                "--dynamics",
                "midpoint",
                *common,
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "auto" / "conversion_report.json").read_text())
    assert rep["o1"]["hard_layers"] == [] and len(rep["o1"]["calibration"]) == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--memory", "o1", "--hard-layers", "1,3"], "names layer 3, but the model's layers are 0..2"),
        (["--hard-layers", "1"], "belong to the O(1) recipe: add --memory o1"),
        (["--memory", "o1", "--dynamics", "midpoint_a"], "needs a rule without a per-layer buffer"),
    ],
)
def test_cli_o1_bad_input(tmp_path, capsys, extra, message):
    src = tiny_hf("llama", dtype=torch.float32)
    src.save_pretrained(tmp_path / "hf")
    data = _token_dir(tmp_path / "tok")
    out = tmp_path / "o1"
    assert _cli(["convert", str(tmp_path / "hf"), str(out), "--distill", str(data), "--steps", "1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "o1.run").exists()


def test_cli_o1_refuses_an_already_converted_model(tmp_path, capsys):
    conv = convert(tiny_hf("llama", dtype=torch.float32), dynamics="leapfrog")
    conv.save_pretrained(tmp_path / "conv")
    data = _token_dir(tmp_path / "tok")
    assert (
        _cli(["convert", str(tmp_path / "conv"), str(tmp_path / "o1"), "--memory", "o1", "--distill", str(data)]) == 2
    )
    err = capsys.readouterr().err
    assert "already a converted revllm model" in err and len(err.strip().splitlines()) == 1


# -- benchmarks/convert_o1.py: the long recipe runs resume exactly -----------------------------------------
def _bench_source(root):
    """A tiny tied Llama with its own byte-level BPE, and a KJV-formatted text ("   N verse" lines)."""
    import random

    import transformers as t
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rnd, words = random.Random(0), "in the beginning god created heaven and earth without form void deep".split()
    text = "\n".join(f"   {i} " + " ".join(rnd.choice(words) for _ in range(12)) for i in range(1, 200))
    (root / "kjv.txt").write_text(text)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    t.LlamaForCausalLM(
        t.LlamaConfig(**cfg, vocab_size=tk.get_vocab_size(), max_position_embeddings=64)
    ).save_pretrained(root)
    t.PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(root)
    return root


def _bench_module():
    """benchmarks/convert_o1.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "convert_o1.py"
    spec = importlib.util.spec_from_file_location("convert_o1_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(monkeypatch, tmp_path):
    import sys

    mod = _bench_module()
    monkeypatch.setattr(mod, "RUNS", tmp_path / "results")
    src = _bench_source(tmp_path)
    flags = f"--source {src} --kjv {src / 'kjv.txt'} --hard-layers 1 --tokens 160 --seq-len 16 --batch-size 2"
    flags += " --eval-tokens 64 --eval-seq-len 32 --ckpt-every 2 --layer-weight 1 --lr 3e-3"

    def run(name, *extra):
        monkeypatch.setattr(sys, "argv", ["convert_o1.py", "run", "--name", name, *flags.split(), *extra])
        mod.main()
        return json.loads((tmp_path / "results" / f"{name}.json").read_text())

    return run


def test_convert_o1_benchmark_run_resumes_bitwise(monkeypatch, tmp_path):
    """A run stopped mid-schedule and resumed ends with the same weights, bit for bit, and the same curve as
    one uninterrupted run: the sampler's position, AdamW's moments, the warm-up and the layer-weight
    schedule all continue. Anything restarted (a fresh sampler, say) would change the weights."""
    from safetensors.torch import load_file

    from revllm.io import list_checkpoints

    run = _bench(monkeypatch, tmp_path)
    whole = run("whole", "--run-dir", str(tmp_path / "whole"), "--warmup", "3")
    with pytest.raises(FileNotFoundError):  # stopped after 3 of 5 steps: no result at the final mark yet
        run("split", "--run-dir", str(tmp_path / "split"), "--warmup", "3", "--stop-after", "3")
    split = run("split", "--run-dir", str(tmp_path / "split"), "--warmup", "3", "--resume")
    assert split["curve"] == whole["curve"] and split["steps"] == 5 and not split["partial"]
    a, b = (
        load_file(str(list_checkpoints(tmp_path / n)[-1] / "model" / "model.safetensors")) for n in ("whole", "split")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (list_checkpoints(tmp_path / "split")[-1] / "model" / "tokenizer.json").is_file()  # `revllm eval` reads it
    start = load_file(str(tmp_path / "model.safetensors"))["model.embed_tokens.weight"]
    assert not torch.equal(a["model.embed_tokens.weight"], start)  # it trained


def test_convert_o1_benchmark_refuses_to_splice_two_recipes(monkeypatch, tmp_path):
    run = _bench(monkeypatch, tmp_path)
    d = str(tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        run("r", "--run-dir", d, "--stop-after", "2")
    with pytest.raises(SystemExit, match="other settings \\(lr\\)"):
        run("r", "--run-dir", d, "--resume", "--lr", "1e-3")
    with pytest.raises(SystemExit, match="holds checkpoints; pass --resume"):
        run("r", "--run-dir", d)


def test_convert_o1_benchmark_branch_continues_another_runs_checkpoint(monkeypatch, tmp_path):
    """--branch-from: a new run continues another one's student, AdamW moments and data position. With the
    parent's own schedule it ends bit-identical to the parent; with --lr-end it keeps the parent's curve up to
    the branch point and then differs; another rule is refused."""
    from safetensors.torch import load_file

    from revllm.io import list_checkpoints

    run = _bench(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError):  # stopped before its first mark: a checkpoint, no result yet
        run("parent", "--run-dir", str(tmp_path / "parent"), "--ckpt-every", "1", "--stop-after", "2")
    ckpt = list_checkpoints(tmp_path / "parent")[-1]
    whole = run("whole", "--run-dir", str(tmp_path / "whole"))
    same = run("same", "--run-dir", str(tmp_path / "same"), "--branch-from", str(ckpt))
    assert same["curve"] == whole["curve"] and same["branch"]["step"] == 2 and same["branch"]["parent"] == "parent"
    w, b = (
        load_file(str(list_checkpoints(tmp_path / n)[-1] / "model" / "model.safetensors")) for n in ("whole", "same")
    )
    assert all(torch.equal(w[k], b[k]) for k in w)
    decay = run("decay", "--run-dir", str(tmp_path / "decay"), "--branch-from", str(ckpt), "--lr-end", "3e-4")
    assert decay["curve"][0] == whole["curve"][0] and decay["curve"][-1] != whole["curve"][-1]
    assert decay["recipe"]["lr_end"] == 3e-4 and decay["name"] == "decay"
    with pytest.raises(SystemExit, match="other settings \\(dynamics\\)"):
        run("bad", "--run-dir", str(tmp_path / "bad"), "--branch-from", str(ckpt), "--dynamics", "midpoint")


def test_convert_o1_benchmark_resumes_a_checkpoint_older_than_a_recipe_key():
    """A checkpoint written before --lr-end and --branch-from existed has no such keys; they were None then,
    so it resumes (the 409,600-token run did) unless a key really differs."""
    mod = _bench_module()
    mine = dict.fromkeys(mod.RECIPE) | {"dynamics": "leapfrog", "lr": 3e-4, "source": "smollm2"}
    old = {k: v for k, v in mine.items() if k not in ("lr_end", "branch_from")}
    assert mod.recipe_diff(old, mine) == []
    assert mod.recipe_diff(old, mine | {"lr_end": 3e-5}) == ["lr_end"]
    assert mod.recipe_diff(old | {"lr": 1e-3}, mine) == ["lr"]
    assert mod.recipe_diff(old | {"lr": 1e-3}, mine | {"lr_end": 1.0}, ignore=mod.SCHEDULE) == []


def test_convert_o1_benchmark_progressive_run_starts_at_the_teacher_and_resumes_exactly(monkeypatch, tmp_path):
    """--progressive: at 0 tokens the student is the teacher (all layers residual), so its perplexity is not
    the converted model's; every layer is converted by the end; a resumed run mid-switch matches a whole one."""
    run = _bench(monkeypatch, tmp_path)
    plain = run("plain", "--run-dir", str(tmp_path / "plain"))
    whole = run("whole", "--run-dir", str(tmp_path / "whole"), "--progressive", "4")
    assert whole["curve"][0]["perplexity"] != plain["curve"][0]["perplexity"]
    assert whole["curve"][-1]["residual_layers"] == 0 and whole["recipe"]["progressive_order"] == "up"
    with pytest.raises(FileNotFoundError):
        run("split", "--run-dir", str(tmp_path / "split"), "--progressive", "4", "--stop-after", "2")
    split = run("split", "--run-dir", str(tmp_path / "split"), "--progressive", "4", "--resume")
    assert split["curve"] == whole["curve"]
    with pytest.raises(SystemExit, match="between 1 and the run's 5 steps"):
        run("long", "--run-dir", str(tmp_path / "long"), "--progressive", "6")


def test_convert_o1_report_marks_partly_residual_points_and_keeps_them_off_the_frontier(monkeypatch, tmp_path):
    """A progressive run's early marks are partly residual models (O(L) memory): the table says how many
    layers are still residual, and the O(1) frontier leaves those marks out."""
    mod = _bench_module()
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    monkeypatch.setattr(mod, "RUNS", tmp_path / "convert_o1")
    (tmp_path / "convert_o1").mkdir()
    (tmp_path / "convert_smollm2.json").write_text(
        json.dumps({"before": {"original": {"perplexity": 18.0}}, "distill": {}})
    )

    def run(name, curve, **recipe):
        r = {"dynamics": "leapfrog", "k": None, "hard_layers": [11, 28], "layer_weight": 0.0, "layer_weight_end": 0.0}
        r |= {"lr": 3e-4, "recipe": recipe, "command": f"run {name}", "curve": curve}
        (tmp_path / "convert_o1" / f"{name}.json").write_text(json.dumps(r))

    run("prog", [{"tokens": 12800, "perplexity": 46.4, "residual_layers": 14}, {"tokens": 25600, "perplexity": 58.3,
        "residual_layers": 0}], progressive=50, progressive_order="up")  # fmt: skip
    run("plain", [{"tokens": 12800, "perplexity": 77.9}])
    mod.report(None)
    md = (tmp_path / "convert_o1.md").read_text()
    assert "| prog | leapfrog, progressive up over 50 steps |" in md and "46.4 (14 residual) | 58.3 |" in md
    front = json.loads((tmp_path / "convert_o1.json").read_text())["frontier"]
    assert [f[0] for f in front] == ["plain"]
