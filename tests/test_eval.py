"""revllm eval: perplexity on token dirs / text, KL, lm-eval tasks through HFLM (built-in local task)."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from revllm.cli import main
from revllm.eval import evaluate_perplexity, kl_divergence


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(95)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


@pytest.fixture
def model_dir(tmp_path):
    model = tiny_model(block="llama", dynamics="midpoint", dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    return tmp_path / "m", model


def test_perplexity_is_exp_of_token_mean_cross_entropy():
    model = tiny_model(dtype=torch.float64).eval()
    ids = torch.randint(0, 97, (50,))
    r = evaluate_perplexity(model, ids, seq_len=16, batch_size=2)
    # windows of 16, 16, 16, 2: every token after a window start is scored once
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, 50, 16):
            w = ids[s : s + 16][None]
            logits = model(w).logits[0, :-1]
            total += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    assert r["tokens"] == n == 46
    assert math.isclose(r["loss"], total / n, rel_tol=1e-12)
    assert math.isclose(r["perplexity"], math.exp(total / n), rel_tol=1e-12)


def test_kl_of_model_with_itself_is_zero_and_positive_otherwise():
    a, b = tiny_model(seed=0, dtype=torch.float64).eval(), tiny_model(seed=1, dtype=torch.float64).eval()
    ids = torch.randint(0, 97, (40,))
    assert abs(kl_divergence(a, a, ids, seq_len=16)) < 1e-12
    assert kl_divergence(a, b, ids, seq_len=16) > 1e-3


def test_cli_eval_token_dir_and_text(model_dir, tmp_path, capsys):
    path, model = model_dir
    ids = np.random.default_rng(0).integers(0, 97, 300).astype(np.uint16)
    data = tmp_path / "tok"
    data.mkdir()
    ids.tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 95}" for i in range(200)))
    out = tmp_path / "r.json"
    assert (
        main(["eval", str(path), "--data", str(data), "--text", str(text), "--seq-len", "64", "--json", str(out)]) == 0
    )
    r = json.loads(out.read_text())
    ref = evaluate_perplexity(model, torch.from_numpy(ids.astype(np.int64)), seq_len=64)
    assert math.isclose(r["data"]["perplexity"], ref["perplexity"], rel_tol=1e-5)
    assert r["text"]["tokens"] == 200 - 4  # 4 windows of <= 64 tokens; each first token is unscored
    assert "perplexity" in capsys.readouterr().out


def test_cli_eval_bad_inputs_are_one_line_errors(model_dir, tmp_path, capsys):
    path, _ = model_dir
    assert main(["eval", str(path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--text", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    assert main(["eval", str(path), "--data", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("revllm eval: error:") and "meta.json" in err[0]
    )  # one line, nothing else


@pytest.mark.slow  # indexes lm-eval's whole task registry (~1 min on 2 busy cores)
def test_unknown_task_is_one_line_error(model_dir, capsys):
    path, _ = model_dir
    assert main(["eval", str(path), "--tasks", "no_such_task"]) == 2
    assert "unknown task(s) no_such_task; built-in: revllm_commonsense" in capsys.readouterr().err


def test_builtin_task_runs_through_lm_eval(model_dir, tmp_path):
    path, model = model_dir
    out = tmp_path / "r.json"
    assert main(["eval", str(path), "--tasks", "revllm_commonsense", "--limit", "6", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["tasks"]["revllm_commonsense"]
    # The exact accuracy: the argmax of the model's own summed continuation log-likelihoods on the first
    # 6 rows (a model that scores anything else, or an unrun task, does not match it).
    from revllm.eval.harness import TASKS_DIR

    rows = [json.loads(line) for line in (TASKS_DIR / "revllm_commonsense.jsonl").read_text().splitlines()][:6]
    tok = _tokenizer()
    want = np.mean(
        [int(np.argmax([_loglik(model, tok, r["question"], c) for c in r["choices"]]) == r["label"]) for r in rows]
    )
    assert res["acc,none"] == pytest.approx(want)


def test_builtin_task_file_is_well_formed():
    from revllm.eval.harness import TASKS_DIR

    rows = [json.loads(line) for line in (TASKS_DIR / "revllm_commonsense.jsonl").read_text().splitlines()]
    assert len(rows) >= 30
    assert all(0 <= r["label"] < len(r["choices"]) == 3 for r in rows)
    assert len({r["label"] for r in rows}) == 3  # gold position varies


def test_user_task_from_include_path_scores_like_the_model(model_dir, tmp_path):
    """A standard task's format (piqa's fields) from the user's own YAML/JSONL folder: lm-eval's accuracy
    equals the argmax of the model's own summed continuation log-likelihoods."""
    path, model = model_dir
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(2, 95, n))  # noqa: E731
    docs = [{"goal": words(5), "sol1": words(2), "sol2": words(3), "label": int(i % 2)} for i in range(8)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "piqa_local.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "piqa_local.yaml").write_text(
        "task: piqa_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {tasks / 'piqa_local.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\ndoc_to_text: '{{goal}}'\n"
        "doc_to_target: label\ndoc_to_choice: '{{[sol1, sol2]}}'\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "r.json"
    assert main(["eval", str(path), "--tasks", "piqa_local", "--include-path", str(tasks), "--json", str(out)]) == 0
    acc = json.loads(out.read_text())["tasks"]["piqa_local"]["acc,none"]

    tok = _tokenizer()

    def loglik(ctx, cont):
        c, x = tok(ctx)["input_ids"], tok(cont)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([c + x])).logits[0].double(), -1)
        return sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(x))

    want = np.mean(
        [int(np.argmax([loglik(d["goal"], d["sol1"]), loglik(d["goal"], d["sol2"])]) == d["label"]) for d in docs]
    )
    assert acc == pytest.approx(want)


def _loglik(model, tok, ctx, cont):
    c, x = tok(ctx)["input_ids"], tok(cont)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([c + x])).logits[0].double(), -1)
    return sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(x))


def test_standard_tasks_run_lm_evals_own_configs_on_local_data(model_dir, tmp_path):
    """--task-data: piqa, arc_easy, hellaswag and winogrande from JSONL in their datasets' fields, scored by
    lm-eval's own task configs. The piqa and winogrande labels are set to the model's choice under those
    configs (piqa's "Question: ...\nAnswer:" prompt; winogrande's partial scoring by its preprocess
    functions), so both score 1.0 exactly when lm-eval's configs ran; naive scorings disagree."""
    path, model = model_dir
    tok = _tokenizer()
    rng = np.random.default_rng(1)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(2, 95, n))  # noqa: E731
    pick = lambda scores: int(np.argmax(scores))  # noqa: E731
    n = 10
    piqa = [{"goal": words(4), "sol1": words(2), "sol2": words(2)} for _ in range(n)]
    for d in piqa:
        d["label"] = pick([_loglik(model, tok, f"Question: {d['goal']}\nAnswer:", s) for s in (d["sol1"], d["sol2"])])
    wino = [{"sentence": f"{words(3)} _ {words(3)}", "option1": words(1), "option2": words(1)} for _ in range(n)]
    for d in wino:
        pre, post = d["sentence"].split(" _ ")
        d["answer"] = str(1 + pick([_loglik(model, tok, f"{pre} {o}", post) for o in (d["option1"], d["option2"])]))
    # the naive alternatives (bare goal; the option scored after the prefix) disagree somewhere
    assert any(pick([_loglik(model, tok, d["goal"], s) for s in (d["sol1"], d["sol2"])]) != d["label"] for d in piqa)
    assert any(
        str(1 + pick([_loglik(model, tok, d["sentence"].split(" _ ")[0], o) for o in (d["option1"], d["option2"])]))
        != d["answer"]
        for d in wino
    )
    # arc_easy ("Question: ...\nAnswer:") and hellaswag ("label: ctx_a Ctx_b", acc on raw endings): gold = the
    # model's own choice under those prompts, so both also score exactly 1.0.
    arc = [
        {"id": str(i), "question": words(5), "choices": {"text": [words(2) for _ in range(4)], "label": list("ABCD")}}
        for i in range(n)
    ]
    for d in arc:
        d["answerKey"] = "ABCD"[
            pick([_loglik(model, tok, f"Question: {d['question']}\nAnswer:", c) for c in d["choices"]["text"]])
        ]
    hella = [
        {
            "ind": i,
            "activity_label": words(1),
            "ctx_a": words(4),
            "ctx_b": words(2),
            "endings": [words(3) for _ in range(4)],
        }
        for i in range(n)
    ]
    for d in hella:
        ctx = f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}"
        d["label"] = str(pick([_loglik(model, tok, ctx, e) for e in d["endings"]]))
    docs = {
        "piqa": piqa,
        "arc_easy": arc,
        "hellaswag": hella,
        "winogrande": wino,
    }
    data = tmp_path / "taskdata"
    data.mkdir()
    for t, ds in docs.items():
        (data / f"{t}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ds))
    out = tmp_path / "r.json"
    assert main(["eval", str(path), "--tasks", ",".join(docs), "--task-data", str(data), "--json", str(out)]) == 0
    res = json.loads(out.read_text())["tasks"]
    assert set(docs) <= set(res) and all(res[t]["acc,none"] == 1.0 for t in docs), {t: res[t]["acc,none"] for t in docs}


def test_task_data_without_the_file_is_one_line_error(model_dir, tmp_path, capsys):
    path, _ = model_dir
    assert main(["eval", str(path), "--tasks", "hellaswag", "--task-data", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "has no hellaswag.jsonl" in err and len(err.strip().splitlines()) == 1


def test_missing_include_path_is_one_line_error(model_dir, tmp_path, capsys):
    path, _ = model_dir
    assert main(["eval", str(path), "--tasks", "piqa_local", "--include-path", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_eval_number_options_are_checked(model_dir, capsys):
    path, _ = model_dir
    for flag, value in (("--batch-size", "-1"), ("--max-tokens", "0"), ("--limit", "0"), ("--seq-len", "0")):
        with pytest.raises(SystemExit) as e:
            main(["eval", str(path), "--tasks", "revllm_commonsense", flag, value])
        assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert main(["eval", str(path), "--tasks", "revllm_commonsense", "--seq-len", "1"]) == 2
    assert "at least 2 tokens" in capsys.readouterr().err


def test_generate_with_an_eos_list_and_refuses_an_empty_prompt(model_dir, capsys):
    path, _ = model_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = [1, 5]  # a list, as Llama-3-style configs have
    (path / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", str(path), "--prompt", "w3 w4", "--max-new-tokens", "3", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("w3 w4")
    assert main(["generate", str(path), "--prompt", "   ", "--greedy"]) == 2
    assert "the prompt has no tokens" in capsys.readouterr().err


def test_generate_keeps_spaces_with_a_metaspace_tokenizer_and_top_k_0_is_off(model_dir, capsys, monkeypatch):
    """SentencePiece-style tokenizers drop the first new word's space when the new ids are decoded alone;
    `--top-k 0` must switch top-k off instead of leaving transformers' default of 50."""
    import transformers.generation.logits_process as lp
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path, _ = model_dir
    words = ["<unk>", "<eos>"] + [f"\u2581w{i}" for i in range(95)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", str(path), "--prompt", "w3 w4", "--max-new-tokens", "4", "--greedy"]) == 0
    out = capsys.readouterr().out.split()
    assert out[:2] == ["w3", "w4"] and len(out) >= 3 and all(re.fullmatch(r"w\d+", w) for w in out), out
    built, init = [], lp.TopKLogitsWarper.__init__
    monkeypatch.setattr(
        lp.TopKLogitsWarper, "__init__", lambda self, top_k, *a, **k: built.append(top_k) or init(self, top_k, *a, **k)
    )
    assert main(["generate", str(path), "--prompt", "w3", "--max-new-tokens", "1", "--top-k", "0"]) == 0
    assert built == []


def test_read_token_dir_reads_only_max_tokens(tmp_path):
    from revllm.eval.perplexity import read_token_dir

    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "val.bin")
    assert torch.equal(read_token_dir(tmp_path, "val", max_tokens=10), torch.arange(10))
    assert len(read_token_dir(tmp_path, "val")) == 1000


def test_kl_runs_both_models_without_dropout_and_keeps_their_modes():
    a = tiny_model(seed=0, dropout=0.3, dtype=torch.float64).train()
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(0))
    assert kl_divergence(a, a, ids, seq_len=16) == 0.0  # the same weights: no dropout noise between the two passes
    assert a.training


def test_cli_eval_warns_when_the_data_has_another_tokenizer(model_dir, tmp_path):
    import warnings

    from revllm.io import tokenizer_identity

    path, _ = model_dir
    data = tmp_path / "tok"
    data.mkdir()
    np.random.default_rng(0).integers(0, 97, 300).astype(np.uint16).tofile(data / "val.bin")
    for sha, warns in ((tokenizer_identity(_tokenizer(), "t")["sha256"], False), ("0" * 64, True)):
        (data / "meta.json").write_text(json.dumps({"dtype": "uint16", "tokenizer": {"name": "other", "sha256": sha}}))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert main(["eval", str(path), "--data", str(data), "--seq-len", "64"]) == 0
        assert any("not with the model's tokenizer" in str(w.message) for w in seen) == warns
