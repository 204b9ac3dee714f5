"""Conversion of tiny random GPT-2 / Llama / Qwen2 HF models: weights, logits, gradients, save/load."""

import json
import warnings

import pytest
import torch
from hf_tiny import FAMILIES, tiny_hf
from transformers import AutoModelForCausalLM

import revllm
from revllm.convert import convert, save_converted
from revllm.errors import RevLLMError

RETROFIT = ["midpoint", "leapfrog", "hamiltonian"]


def _ids(B=2, T=20, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_weight_lands(family):
    src = tiny_hf(family)
    rev = convert(src, dynamics="midpoint", dtype=torch.float64)
    ref = src.state_dict()
    prefix = "transformer." if family == "gpt2" else "model."
    rsd = rev.state_dict()
    for key, t in ref.items():
        rkey = "model." + key[len(prefix) :] if key.startswith(prefix) else key
        assert rkey in rsd, rkey
        assert torch.equal(rsd[rkey], t), rkey
    extra = set(rsd) - {("model." + k[len(prefix) :]) if k.startswith(prefix) else k for k in ref}
    assert extra <= {"lm_head.weight"}  # tied head
    if family == "qwen2":
        assert rev.config.qkv_bias and rev.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_euler_reproduces_original_logits(family):
    src = tiny_hf(family)
    ids = _ids()
    rev = convert(src, dynamics="euler", dtype=torch.float64)
    with torch.no_grad():  # (HF's Llama/Qwen2 RMSNorm rounds to fp32 even in a float64 model; revllm's does not)
        assert (rev(ids).logits - src(ids).logits).abs().max() < (1e-10 if family == "gpt2" else 1e-6)
    src32, rev32 = src.float(), convert(src.float(), dynamics="euler")
    with torch.no_grad():
        assert (rev32(ids).logits - src32(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llama"])
def test_untied_head_is_copied(family):
    src = tiny_hf(family, tie=False)
    rev = convert(src, dynamics="euler", dtype=torch.float64)
    assert not rev.config.tie_word_embeddings
    assert torch.equal(rev.lm_head.weight, src.lm_head.weight)
    assert rev.lm_head.weight.data_ptr() != rev.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dynamics", RETROFIT)
def test_retrofit_memory_free_grads_match_stored(family, dynamics):
    src = tiny_hf(family)
    ids = _ids()
    grads = {}
    for mf in (True, False):
        rev = convert(src, dynamics=dynamics, dtype=torch.float64, memory_free=mf).train()
        rev(ids, labels=ids).loss.backward()
        grads[mf] = {n: p.grad.clone() for n, p in rev.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-9, atol=1e-11, msg=n)


def test_fixed_point_start_makes_midpoint_first_layer_residual():
    # midpoint with h=1 and p_{-1} = p_0 - f_0(p_0): p_1 = p_{-1} + 2 f_0(p_0) = p_0 + f_0(p_0).
    src = tiny_hf("llama", layers=1)
    ids = _ids()
    rev = convert(src, dynamics="midpoint", dtype=torch.float64)
    with torch.no_grad():  # 1e-6: HF's RMSNorm rounds to fp32 (see test_euler_reproduces_original_logits)
        assert (rev(ids).logits - src(ids).logits).abs().max() < 1e-6


def _without_layers(src):
    """The source with every residual branch zeroed (output projections = 0): embeddings + head only."""
    import copy

    z = copy.deepcopy(src)
    with torch.no_grad():
        for n, p in z.named_parameters():
            if any(s in n for s in ("o_proj", "down_proj", "c_proj")):
                p.zero_()
    return z


@pytest.mark.parametrize("family", FAMILIES)
def test_near_euler_k8_stays_close_to_the_original(family):
    """Near-Euler (a = 2^-k) deviates from the residual network by O(a) of what the layers contribute.
    Measured against that contribution (original vs the same model with its layers zeroed), not against
    the loss: on random tiny models the layers move the loss by < 0.3%, so a loss tolerance of 1% also
    passed a model with zeroed layers. Observed ratio ~0.005 at k=8 (a = 1/256); zeroed layers give 1."""
    src = tiny_hf(family, layers=4)
    ids = _ids(B=4, T=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rev8 = convert(src, dynamics="midpoint_a", k=8, dtype=torch.float64)
        rev4 = convert(src, dynamics="midpoint_a", k=4, dtype=torch.float64)
    assert rev8.config.midpoint_a == 2.0**-8
    with torch.no_grad():
        orig, layers_off = src(ids).logits, _without_layers(src)(ids).logits
        contribution = (orig - layers_off).norm()
        dev8, dev4 = ((m(ids).logits - orig).norm() / contribution for m in (rev8, rev4))
    assert dev8 <= 0.02
    assert dev4 > 4 * dev8  # the deviation scales with a (16x larger a, ~16x larger deviation)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(tmp_path, family):
    src = tiny_hf(family)
    rev = convert(src, dynamics="leapfrog", dtype=torch.float64)
    out = save_converted(rev, tmp_path / "conv")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    assert isinstance(back, revllm.RevLLMForCausalLM)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, rev(ids).logits)
    assert back.generation_config.eos_token_id == src.generation_config.eos_token_id
    with pytest.raises(RevLLMError, match="not empty"):
        save_converted(rev, out)


def test_hf_directory_source_and_tokenizer_copied(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    src = tiny_hf("llama", dtype=torch.float32)
    src.save_pretrained(tmp_path / "hf")
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0").save_pretrained(tmp_path / "hf")
    from revllm.cli import main as cli_main

    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--dynamics", "euler"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        ids = _ids()
        assert (back(ids).logits - src(ids).logits).abs().max() < 1e-5


def test_unsupported_architecture_lists_supported(tmp_path):
    import transformers as t

    bert = t.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(RevLLMError, match="supported: GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        convert(t.BertForMaskedLM(bert))
    bert.save_pretrained(tmp_path)
    with pytest.raises(RevLLMError, match="unsupported architecture 'bert'"):
        convert(tmp_path)


def test_pickle_weights_are_never_loaded(tmp_path):
    """A source directory with only pickled weights (pytorch_model.bin) is refused before anything is
    unpickled; the same directory with safetensors converts."""
    src = tiny_hf("gpt2", dtype=torch.float32)
    src.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(src.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(RevLLMError, match="no .safetensors weights"):
        convert(tmp_path / "hf")
    src.save_pretrained(tmp_path / "hf")
    assert convert(tmp_path / "hf", dynamics="euler").config.dynamics == "euler"


def test_cli_bad_source_is_one_line_error(tmp_path, capsys):
    from revllm.cli import main

    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a model directory nor a .gguf file" in err


# -- distillation ------------------------------------------------------------------------------------
def test_distill_loss_matches_manual_kl_and_vanishes_for_identical_student():
    import torch.nn.functional as F

    from revllm.convert.distill import DistillLoss

    src = tiny_hf("llama")
    ids = _ids(B=2, T=12)
    same = convert(src, dynamics="euler", dtype=torch.float64)
    loss, met = DistillLoss(src, temperature=2.0)(same, {"input_ids": ids})
    assert abs(loss.item()) < 1e-6 and abs(met["kl"]) < 1e-6
    student = convert(src, dynamics="midpoint", dtype=torch.float64).train()
    loss, met = DistillLoss(src, temperature=2.0, ce_weight=0.5, hidden_weight=0.1, chunk_tokens=7)(
        student, {"input_ids": ids}
    )
    with torch.no_grad():
        lq = F.log_softmax(student(ids).logits / 2, -1)
        lp = F.log_softmax(src(ids).logits / 2, -1)
        kl = 4 * (lp.exp() * (lp - lq)).sum(-1).mean().item()
        ce = F.cross_entropy(student(ids).logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).item()
    assert abs(met["kl"] - kl) < 1e-4 * max(1, kl) and abs(met["ce"] - ce) < 1e-4
    assert met["hidden_mse"] > 0
    loss.backward()  # memory-free student: gradients reach the blocks, the teacher stays frozen
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in src.parameters())


def test_distill_loss_never_holds_full_logits():
    # Neither the student's nor the teacher's (B, T, V) logits may be saved for backward or kept alive.
    from revllm.convert.distill import DistillLoss

    src = tiny_hf("llama")
    student = convert(src, dynamics="midpoint").train()
    ids = _ids(B=2, T=12)
    V = student.config.vocab_size
    params = {p.untyped_storage().data_ptr() for m in (src, student) for p in m.parameters()}
    logit_rows = []  # rows of vocabulary-wide tensors, counted by their storage (a view keeps it all alive)

    def pack(t):
        if t.shape and t.shape[-1] == V and t.untyped_storage().data_ptr() not in params:
            logit_rows.append(t.untyped_storage().nbytes() // (V * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = DistillLoss(src, chunk_tokens=8)(student, {"input_ids": ids})
    assert all(r <= 8 for r in logit_rows)  # at most a chunk of 8 of the 24 positions, never all of them
    loss.backward()


def test_near_euler_default_is_exact_and_memory_free_grads_are_bitwise():
    src = tiny_hf("llama", layers=4, dtype=torch.float32)
    ids = _ids(B=2, T=16)
    grads = {}
    for mf in (True, False):
        rev = convert(src, memory_free=mf).train()  # default: midpoint_a, k=4
        assert rev.config.dynamics == "midpoint_a" and rev.config.exact_reversal and rev.config.midpoint_a == 1 / 16
        rev(ids, labels=ids).loss.backward()
        grads[mf] = {n: p.grad for n, p in rev.named_parameters() if p.grad is not None}
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[False])


def test_anneal_a_schedule_and_exactness_after_annealing():
    from revllm.convert.distill import AnnealA

    sched = AnnealA(4, 0, steps=8)
    assert [sched.k_at(s) for s in (0, 2, 4, 6, 8, 20)] == [4, 3, 2, 1, 0, 0]
    assert AnnealA(4, 0, steps=1).k_at(0) == 0  # a one-step schedule still ends at k_end
    src = tiny_hf("gpt2", dtype=torch.float32)
    rev = convert(src, k=4).train()
    assert sched(rev, 4) == 2 and rev.dynamics.a.tolist() == [0.25] * 3 and rev.config.midpoint_a == 0.25
    ids = _ids(B=2, T=10)
    rev(ids, labels=ids).loss.backward()
    g = {n: p.grad.clone() for n, p in rev.named_parameters() if p.grad is not None}
    rev.zero_grad()
    rev.config.memory_free = False
    rev(ids, labels=ids).loss.backward()
    assert all(torch.equal(g[n], p.grad) for n, p in rev.named_parameters() if p.grad is not None)


def _token_dir(path, n_train=3000, n_val=600, vocab=97):
    import json

    import numpy as np

    path.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, n_train).astype(np.uint16).tofile(path / "train.bin")
    rng.integers(0, vocab, n_val).astype(np.uint16).tofile(path / "val.bin")
    (path / "meta.json").write_text(
        json.dumps(
            {
                "dtype": "uint16",
                "tokenizer": {"vocab_size": vocab, "name": "test"},
                "train_tokens": n_train,
                "val_tokens": n_val,
            }
        )
    )
    return path


def test_cli_finetune_distills_on_the_training_loop_and_resumes(tmp_path):
    from revllm.cli import main as cli_main

    src = tiny_hf("llama", dtype=torch.float32)
    src.save_pretrained(tmp_path / "hf")
    data = _token_dir(tmp_path / "tok")
    run = tmp_path / "run"
    common = [
        "--data",
        str(data),
        "--out",
        str(run),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--lr",
        "1e-3",
        "--eval-interval",
        "2",
        "--checkpoint-interval",
        "2",
        "--warmup",
        "0",
    ]
    assert cli_main(["finetune", str(tmp_path / "hf"), "--steps", "2", "--dynamics", "midpoint", *common]) == 0
    assert (run / "metrics.csv").is_file() and (run / "checkpoints").is_dir()
    first = AutoModelForCausalLM.from_pretrained(run / "model")
    assert first.config.dynamics == "midpoint"
    assert (
        cli_main(["finetune", str(tmp_path / "hf"), "--steps", "4", "--resume", "--dynamics", "midpoint", *common]) == 0
    )
    import json

    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_cli_finetune_lora_sft_and_anneal(tmp_path):
    from revllm.cli import main as cli_main

    rev = convert(tiny_hf("gpt2", dtype=torch.float32), k=3)
    save_converted(rev, tmp_path / "conv")
    data = _token_dir(tmp_path / "tok")
    assert (
        cli_main(
            [
                "finetune",
                str(tmp_path / "conv"),
                "--sft",
                "--lora",
                "4",
                "--anneal-a",
                "1",
                "--steps",
                "4",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "run"),
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--eval-interval",
                "4",
                "--checkpoint-interval",
                "4",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert back.config.midpoint_a == 0.5  # k annealed 3 -> 1
    assert not any("lora" in k for k in back.state_dict())  # adapters merged
    assert cli_main(["finetune", str(tmp_path / "conv"), "--data", str(data), "--out", str(tmp_path / "r2")]) == 2
    # conversion flags on an already converted model would be ignored: refused instead
    assert (
        cli_main(
            [
                "finetune",
                str(tmp_path / "conv"),
                "--sft",
                "--dynamics",
                "leapfrog",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "r3"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "r3").exists()


def test_annealed_finetune_resumes_its_schedule_bit_identically(tmp_path):
    """An a-annealing run interrupted at step 2 and resumed equals the uninterrupted run bit for bit: the
    schedule (RUN/anneal.json) continues from the checkpoint's step instead of being lost."""
    from revllm.convert.distill import AnnealA
    from revllm.convert.finetune import finetune

    data = _token_dir(tmp_path / "tok")
    opts = dict(
        max_steps=4, batch_size=2, seq_len=16, lr=1e-3, warmup=0, eval_interval=4, checkpoint_interval=2, progress=False
    )
    conv = lambda: convert(tiny_hf("llama", dtype=torch.float32), k=3)  # noqa: E731
    full = finetune(conv(), data, tmp_path / "full", anneal=AnnealA(3, 1, 4), **opts)["model"]
    finetune(conv(), data, tmp_path / "cut", anneal=AnnealA(3, 1, 4), stop_after=2, **opts)
    assert json.loads((tmp_path / "cut" / "anneal.json").read_text()) == {"k_start": 3, "k_end": 1, "steps": 4}
    resumed = finetune(None, data, tmp_path / "cut", resume=True, **opts)["model"]
    assert resumed.config.midpoint_a == full.config.midpoint_a == 0.5
    ref = full.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in resumed.state_dict().items())
    with pytest.raises(RevLLMError, match="continues the run's own"):
        finetune(None, data, tmp_path / "cut", resume=True, anneal=AnnealA(3, 1, 4), **opts)
    # An annealed start refused before its first checkpoint leaves no schedule to a later plain run's resume.
    with pytest.raises(RevLLMError, match="seq_len"):
        finetune(conv(), data, tmp_path / "stale", anneal=AnnealA(3, 1, 4), **{**opts, "seq_len": 999})
    finetune(conv(), data, tmp_path / "stale", stop_after=2, **opts)
    assert not (tmp_path / "stale" / "anneal.json").exists()
    resumed = finetune(None, data, tmp_path / "stale", resume=True, **opts)["model"]
    assert resumed.config.midpoint_a == 0.125  # k = 3 throughout: never annealed


def test_cli_finetune_of_a_run_of_a_plain_hf_model(tmp_path):
    """`revllm finetune RUN` where RUN is `revllm train --init-from HF_DIR`: the student is converted from
    the model loaded out of the run's latest checkpoint (RUN itself has no config.json)."""
    from revllm.cli import main as cli_main

    tiny_hf("gpt2", dtype=torch.float32).save_pretrained(tmp_path / "hf")
    data = _token_dir(tmp_path / "tok")
    small = [
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-interval",
        "1",
        "--checkpoint-interval",
        "1",
        "--warmup",
        "0",
    ]
    assert (
        cli_main(
            [
                "train",
                "--init-from",
                str(tmp_path / "hf"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "run"),
                "--max-steps",
                "1",
                "--no-progress",
                *small,
            ]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "finetune",
                str(tmp_path / "run"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "ft"),
                "--steps",
                "1",
                *small,
            ]
        )
        == 0
    )
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "model").config.model_type == "revllm"


def _tiny_run_flags(data, out):
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--lr",
        "1e-3",
        "--eval-interval",
        "2",
        "--checkpoint-interval",
        "2",
        "--warmup",
        "0",
    ]


def test_cli_finetune_resume_keeps_the_runs_settings(tmp_path):
    """A stopped run resumed with no training flags runs to its own --steps with its own settings; a flag
    that cannot change (lr) is refused in one line instead of being dropped."""
    from revllm.cli import main as cli_main

    rev = convert(tiny_hf("llama", dtype=torch.float32), k=3)
    save_converted(rev, tmp_path / "conv")
    data, run = _token_dir(tmp_path / "tok"), tmp_path / "run"
    assert (
        cli_main(
            [
                "finetune",
                str(tmp_path / "conv"),
                "--sft",
                "--steps",
                "4",
                "--max-time",
                "1e-9",
                *_tiny_run_flags(data, run),
            ]
        )
        == 0
    )
    assert json.loads((run / "summary.json").read_text())["steps"] == 1  # stopped after its first step
    assert (
        cli_main(
            [
                "finetune",
                str(tmp_path / "conv"),
                "--sft",
                "--resume",
                "--lr",
                "5e-5",
                "--data",
                str(data),
                "--out",
                str(run),
            ]
        )
        == 2
    )
    assert (
        cli_main(["finetune", str(tmp_path / "conv"), "--sft", "--resume", "--data", str(data), "--out", str(run)]) == 0
    )
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 4 and s["config"]["lr"] == 1e-3 and s["config"]["seq_len"] == 16


def test_cli_convert_distill_resume_continues_the_distilled_student(tmp_path, capsys):
    """convert --distill stopped early, then --resume: OUT gets the resumed run's final student (equal to
    OUT.run/model), not a fresh conversion; a trailing slash on OUT keeps OUT.run beside OUT."""
    from revllm.cli import main as cli_main

    tiny_hf("llama", dtype=torch.float32).save_pretrained(tmp_path / "hf")
    data, out = _token_dir(tmp_path / "tok"), tmp_path / "out"
    flags = [
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--lr",
        "1e-3",
        "--eval-interval",
        "2",
        "--checkpoint-interval",
        "2",
        "--warmup",
        "0",
    ]
    assert (
        cli_main(
            [
                "convert",
                str(tmp_path / "hf"),
                str(out) + "/",
                "--k",
                "3",
                "--distill",
                str(data),
                "--steps",
                "4",
                "--max-time",
                "1e-9",
                *flags,
            ]
        )
        == 0
    )
    assert (tmp_path / "out.run" / "checkpoints").is_dir() and not (out / ".run").exists()
    assert json.loads((out / "conversion_report.json").read_text())["distill"]["steps"] == 1
    assert cli_main(["convert", str(tmp_path / "hf"), str(out), "--k", "3", "--distill", str(data), "--resume"]) == 0
    assert json.loads((out / "conversion_report.json").read_text())["distill"]["steps"] == 4
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out.run" / "model").state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in final.items())
    fresh = convert(tiny_hf("llama", dtype=torch.float32), k=3).state_dict()
    assert not all(torch.equal(v, fresh[k]) for k, v in final.items())
    capsys.readouterr()
    # a non-empty OUT that is not this run's is refused before any work
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "busy"), "--distill", str(data)]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert not (tmp_path / "busy.run").exists() and (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_bad_finetune_inputs_are_one_line_errors(tmp_path, capsys):
    from revllm.cli import main as cli_main
    from revllm.convert.distill import DistillLoss

    data = _token_dir(tmp_path / "tok")
    # --anneal-a on a from-scratch midpoint_a model (random a, no single 2^-k)
    scratch = revllm.RevLLMForCausalLM(
        revllm.RevLLMConfig(
            block="llama",
            dynamics="midpoint_a",
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=97,
        )
    )
    scratch.save_pretrained(tmp_path / "scratch")
    assert (
        cli_main(
            [
                "finetune",
                str(tmp_path / "scratch"),
                "--sft",
                "--anneal-a",
                "0",
                "--steps",
                "2",
                *_tiny_run_flags(data, tmp_path / "r1"),
            ]
        )
        == 2
    )
    assert "needs one coefficient a = 2^-k" in capsys.readouterr().err
    # a teacher with another vocabulary
    student = convert(tiny_hf("llama", dtype=torch.float32), k=3)
    teacher = tiny_hf("llama", dtype=torch.float32)
    teacher.resize_token_embeddings(120)
    with pytest.raises(RevLLMError, match=r"teacher's vocabulary \(120 tokens\) differs from the student's \(97\)"):
        DistillLoss(teacher).check(student)


def test_save_model_atomic_recovers_from_an_interrupted_earlier_save(tmp_path):
    from revllm.io import save_model_atomic

    rev = convert(tiny_hf("llama", dtype=torch.float32), k=3)
    stale = tmp_path / ".model.old"
    stale.mkdir()
    (stale / "x").write_text("left by a crash between the two renames")
    save_model_atomic(rev, tmp_path / "model")
    save_model_atomic(rev, tmp_path / "model")  # replaces an existing model too
    assert (tmp_path / "model" / "config.json").is_file() and not stale.exists()


@pytest.mark.slow
def test_real_smollm2_euler_conversion_matches_and_generates():
    """The real SmolLM2-135M-Instruct (cached fp32 copy of the GGUF): euler reproduces it; near-Euler stays close."""
    try:
        from revllm.io import smollm2_model_dir

        d = smollm2_model_dir()
    except RevLLMError as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    src = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    rev = convert(src, dynamics="euler")
    with torch.no_grad():
        assert (rev(ids).logits - src(ids).logits).abs().max() < 1e-3
    out = rev.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
    near = convert(src, k=6)
    assert "Paris" in tok.decode(near.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :])


def _report_oracle(src, conv, ids, win):
    """(original ppl, converted ppl, KL(original || converted) per token) over consecutive windows of
    ``win`` tokens, computed here from plain forwards: the values the conversion report must show."""
    import math

    import torch.nn.functional as F

    ce = {"src": 0.0, "conv": 0.0}
    kl, n_pred, n_pos = 0.0, 0, 0
    with torch.no_grad():
        for s in range(0, len(ids), win):
            w = ids[s : s + win][None]
            if w.shape[1] < 2:
                continue
            lp = F.log_softmax(src(w).logits[0].double(), -1)
            lq = F.log_softmax(conv(w).logits[0].double(), -1)
            for k, logp in (("src", lp), ("conv", lq)):
                ce[k] -= logp[:-1].gather(1, w[0, 1:, None]).sum().item()
            kl += (lp.exp() * (lp - lq)).sum().item()
            n_pred, n_pos = n_pred + w.shape[1] - 1, n_pos + w.shape[1]
    return math.exp(ce["src"] / n_pred), math.exp(ce["conv"] / n_pred), kl / n_pos


def test_cli_convert_with_report_and_distill(tmp_path, capsys, monkeypatch):
    import importlib
    import json

    from revllm.cli import main as cli_main

    src = tiny_hf("qwen2", dtype=torch.float32)
    src.save_pretrained(tmp_path / "hf")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # In memory: saved next to a qwen2 config, AutoTokenizer would load it as Qwen2's own tokenizer class.
    monkeypatch.setattr(
        importlib.import_module("revllm.commands.convert"),
        "load_source_tokenizer",
        lambda src: PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0"),
    )
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 97}" for i in range(300)))
    data = _token_dir(tmp_path / "tok")
    out = tmp_path / "conv"
    assert (
        cli_main(
            [
                "convert",
                str(tmp_path / "hf"),
                str(out),
                "--k",
                "3",
                "--report-text",
                str(text),
                "--seq-len",
                "32",
                "--distill",
                str(data),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--eval-interval",
                "2",
                "--checkpoint-interval",
                "2",
            ]
        )
        == 0
    )
    rep = json.loads((out / "conversion_report.json").read_text())
    assert rep["distill"]["steps"] == 2 and rep["report_tokens"] == 300
    # the report's figures (measured before distillation) equal plain forwards of original and conversion
    src32 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    want = _report_oracle(
        src32, convert(src32, dynamics="midpoint_a", k=3), torch.tensor([(i * 7) % 97 for i in range(300)]), 32
    )
    got = (rep["original_ppl"], rep["converted_ppl"], rep["kl_original_converted"])
    assert got == pytest.approx(want, rel=1e-4), (got, want)
    assert want[2] > 1e-6  # k=3 really changed the model (a = 1/8): the KL is not a rounding-level zero
    assert "KL(original || converted)" in capsys.readouterr().out
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.config.midpoint_a == 1 / 8 and back.config.exact_reversal


def test_final_norm_is_found_through_ddp_around_peft():
    """Under torchrun the distillation loss sees DDP(PeftModel(RevLLM)); the hidden-state term needs the
    student's final norm through both wrappers, in that order."""
    from revllm.convert.distill import final_norm
    from revllm.convert.finetune import add_lora

    rev = convert(tiny_hf("llama", dtype=torch.float32))
    norm = final_norm(rev)
    peft = add_lora(rev, r=2)

    class DDPLike(torch.nn.Module):  # DistributedDataParallel's shape: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert final_norm(peft) is norm and final_norm(DDPLike(peft)) is norm


def test_cli_convert_report_window_fits_the_model(tmp_path, capsys, monkeypatch):
    """The report's default window (128) is capped at a 64-position model's table (it was an IndexError);
    a larger --seq-len and a --report-tokens below 2 get one-line errors."""
    import importlib
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from revllm.cli import main as cli_main

    tiny_hf("gpt2", dtype=torch.float32).save_pretrained(tmp_path / "hf")  # n_positions=64
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # In memory: saved next to a gpt2 config, AutoTokenizer would load it as GPT-2's own tokenizer class.
    monkeypatch.setattr(
        importlib.import_module("revllm.commands.convert"),
        "load_source_tokenizer",
        lambda src: PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0"),
    )
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 97}" for i in range(300)))
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "c2"), "--report-text", str(text)]) == 0
    rep = json.loads((tmp_path / "c2" / "conversion_report.json").read_text())
    assert rep["report_tokens"] == 300
    # exact values: windows of min(128, 64 positions) = 64, plain forwards of the source and the saved model
    src32 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    want = _report_oracle(
        src32,
        AutoModelForCausalLM.from_pretrained(tmp_path / "c2"),
        torch.tensor([(i * 7) % 97 for i in range(300)]),
        64,
    )
    got = (rep["original_ppl"], rep["converted_ppl"], rep["kl_original_converted"])
    assert got == pytest.approx(want, rel=1e-4), (got, want)
    for bad, msg in (
        (["--seq-len", "65"], "exceeds the source model's 64 positions"),
        (["--report-tokens", "1"], ">= 2"),
    ):
        capsys.readouterr()
        assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "c3"), "--report-text", str(text), *bad]) == 2
        assert msg in capsys.readouterr().err
