"""benchmarks/scratch_parity.py: grid validation, the by-document split, resume (skip completed, continue
a partial run from its checkpoint), and its JSON/Markdown/PNG results, on a tiny smoke configuration."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from revllm.data import prepare
from revllm.errors import RevLLMError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scratch_parity.py"


def _load():
    spec = importlib.util.spec_from_file_location("scratch_parity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sp = _load()
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _corpus(tmp_path, n=40) -> Path:
    """n documents, each a distinct sentence repeated, one JSONL line each."""
    f = tmp_path / "docs.jsonl"
    with open(f, "w") as fh:
        for i in range(n):
            text = f"doc{i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12)) + ".\n"
            fh.write(json.dumps({"text": text * 6}) + "\n")
    return f


TINY = "--hidden 32 --heads 2 --seq-len 16 --batch-size 2 --tokens 192 --depths 2 --other none --seeds 0 --vocab 300 --evals 2 --eval-iters 2 --checkpoint-every 3 --val-fraction 0.1".split()


def _args(tmp_path, *extra):
    return [
        "--out",
        str(tmp_path / "out"),
        "--results",
        str(tmp_path / "res" / "sp"),
        "--corpus",
        str(_corpus(tmp_path)),
        *TINY,
        *extra,
    ]


# -- grid validation ---------------------------------------------------------------------------------------
def test_heads_not_dividing_width_refused_in_one_line_before_training(tmp_path):
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *_args(tmp_path, "--heads", "3", "--rules", "euler,midpoint")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_attention_heads=3 must divide hidden_size=32" in lines[0]
    assert "final-llama2-euler" in lines[0]  # names the run
    assert not (tmp_path / "out").exists() and not (tmp_path / "res").exists()  # nothing prepared or trained


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--phase", "tune", "--rules", "euler,midpoint_a", "--a-dists", "paper,const:0.3"], "not a nonzero dyadic"),
        (["--rules", "euler,midpoint_a", "--a-dists", "const:0.1", "--no-exact"], "below midpoint_a_floor"),
        (["--rules", "euler,rk4"], "unknown rule 'rk4'"),
        (["--other", "gpt3:6"], "block='gpt3' is unknown"),
        (["--phase", "tune", "--tune-size", "llama"], "FAMILY:LAYERS"),
    ],
)
def test_impossible_grid_entries_refused(tmp_path, bad, message):
    with pytest.raises(RevLLMError, match=message):
        sp.main(_args(tmp_path, *bad))
    assert not (tmp_path / "out").exists()


def test_tune_grid_covers_rule_settings_and_lr():
    args = sp.parse_args(["--phase", "tune", "--lr", "1e-3", "--seeds", "0"])
    grid = sp.build_grid(args, 8192, {"runs": {}})
    by_rule = {}
    for s in grid:
        by_rule.setdefault(s["rule"], []).append(s["settings"])
    assert "euler_ckpt" not in by_rule
    assert sorted(x["lr"] for x in by_rule["euler"]) == [5e-4, 1e-3, 2e-3]
    assert {(x["a_dist"], x["step_size"]) for x in by_rule["midpoint_a"] if x["lr"] == 1e-3} == {
        ("paper", 1.0),
        ("paper", 0.5),
        ("positive", 1.0),
        ("positive", 0.5),
    }
    for s in grid:  # the runs users would make: memory-free + exact for the reversible rules
        rev = s["rule"] in sp.REVERSIBLE
        assert (
            s["train"]["memory_free"] == rev
            and s["train"]["exact_reversal"] == rev
            and "exact_reversal" not in s["model_extra"]
        )


def test_final_phase_takes_best_tuned_setting():
    tuned = {
        "runs": {
            "a": {
                "phase": "tune",
                "rule": "leapfrog",
                "status": "ok",
                "val_loss": 4.0,
                "settings": {"lr": 1, "step_size": 0.5},
            },
            "b": {
                "phase": "tune",
                "rule": "leapfrog",
                "status": "ok",
                "val_loss": 3.9,
                "settings": {"lr": 1, "step_size": 1.0},
            },
            "c": {"phase": "tune", "rule": "euler", "status": "ok", "val_loss": 4.2, "settings": {"lr": 2}},
        }
    }
    assert sp.best_tuned(tuned, "leapfrog") == {"lr": 1, "step_size": 1.0}
    assert sp.best_tuned(tuned, "euler_ckpt") == {"lr": 2}  # euler's arithmetic, euler's setting
    assert sp.best_tuned(tuned, "midpoint") is None


def test_midpoint_a_distributions_are_dyadic_with_exact_reversal():
    from revllm.dynamics import fixedpoint as fxp

    paper = sp.midpoint_a_value("paper", 16, 0, exact=True)
    pos = sp.midpoint_a_value("positive", 16, 0, exact=True)
    assert any(a < 0 for a in paper) and all(a > 0 for a in pos)
    assert all(fxp.dyadic(a) is not None and 0.5 <= abs(a) <= 1.5 for a in paper + pos)


# -- the by-document split ---------------------------------------------------------------------------------
def test_document_split_holds_out_whole_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 64)  # text files arrive in several pieces: still one document
    folder = tmp_path / "texts"
    folder.mkdir()
    texts = []
    for i in range(25):
        t = "".join(
            f"doc{i} line {k}: " + " ".join(WORDS[(i + k) % len(WORDS)] for _ in range(3)) + "\n" for k in range(8)
        )
        (folder / f"{i:02d}.txt").write_text(t)
        texts.append(t)
    tok = sp.train_tokenizer([str(folder)], 0.1, 300, tmp_path / "tok")
    meta = prepare.prepare_tokens(
        [str(folder)], tmp_path / "data", tokenizer=str(tok), val_fraction=0.1, split="document", progress=False
    )
    assert meta["split"] == "document" and meta["documents"] == 25

    from revllm.io import load_tokenizer

    t = load_tokenizer(tmp_path / "data" / "tokenizer")
    sep = meta["tokenizer"]["separator_id"]

    def docs(split):
        ids = np.fromfile(tmp_path / "data" / f"{split}.bin", dtype=meta["dtype"]).tolist()
        out, cur = [], []
        for x in ids:
            if x == sep:
                out.append(t.decode(cur))
                cur = []
            else:
                cur.append(x)
        assert not cur  # every document ends with its separator
        return out

    held = [texts[i] for i in range(25) if prepare.held_out(i, 0.1)]
    assert len(held) == 2  # every 10th of 25
    assert docs("val") == held
    assert docs("train") == [x for i, x in enumerate(texts) if not prepare.held_out(i, 0.1)]
    assert list(prepare.documents([str(folder)])) == texts  # the numbering the tokenizer trainer uses


def test_document_split_needs_enough_documents(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("just one document here\n")
    tok = sp.train_tokenizer([str(f)], 0.2, 280, tmp_path / "tok")
    with pytest.raises(RevLLMError, match="needs at least 5 documents; the inputs hold 1"):
        prepare.prepare_tokens(
            [str(f)], tmp_path / "data", tokenizer=str(tok), val_fraction=0.2, split="document", progress=False
        )
    assert not (tmp_path / "data" / "meta.json").exists()


# -- end to end: kill, resume, skip ------------------------------------------------------------------------
def test_partial_run_resumes_and_completed_runs_are_skipped(tmp_path):
    args = _args(tmp_path, "--rules", "euler,midpoint_a", "--zero-shot-task", "")
    assert sp.main(args + ["--stop-after", "3"]) == 3  # the first run is "killed" after its step-3 checkpoint
    run = tmp_path / "out" / "runs" / "final-llama2-euler-lr0.002-t0.000192M-s0"
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000003"]
    assert not (run / "result.json").exists()
    assert not (tmp_path / "res" / "sp.json").exists()

    assert sp.main(args) == 0  # resumes the partial run from step 3, then runs the second
    log = (run / "metrics.csv").read_text().splitlines()
    assert [int(x.split(",")[0]) for x in log[1:]] == [1, 2, 3, 4, 5, 6]  # one history, no restart
    res = json.loads((tmp_path / "res" / "sp.json").read_text())
    assert sorted(res["runs"]) == [
        "final-llama2-euler-lr0.002-t0.000192M-s0",
        "final-llama2-midpoint_a-apaper_lr0.002_h1-t0.000192M-s0",
    ]
    r = res["runs"]["final-llama2-midpoint_a-apaper_lr0.002_h1-t0.000192M-s0"]
    assert r["status"] == "ok" and r["memory_free"] and r["exact_reversal"] and r["steps"] == 6
    assert r["val_tokens_scored"] > 0 and len(r["curve"]) == 6
    md = (tmp_path / "res" / "sp.md").read_text()
    assert "llama-2, 0.000192M tokens | midpoint_a | apaper_lr0.002_h1 | 1 |" in md
    assert list((tmp_path / "res").glob("sp_final_*.png"))

    before = (tmp_path / "res" / "sp.json").read_text()
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").glob("*/worker.log")}
    assert sp.main(args) == 0  # everything done: nothing runs
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    assert json.loads((tmp_path / "res" / "sp.json").read_text())["runs"] == json.loads(before)["runs"]


def test_memory_phase_measures_one_step_per_depth_and_reports_the_ratio(tmp_path):
    """`--phase memory` trains one step per size x rule (first seed) and tabulates the bytes saved for
    backward by depth: flat for a memory-free rule, growing with depth for euler. `--report` rewrites the
    Markdown from the JSON alone."""
    args = _args(tmp_path, "--rules", "euler,leapfrog", "--zero-shot-task", "", "--phase", "memory")
    args[args.index("--depths") + 1] = "2,6"
    args[args.index("--seeds") + 1] = "0,1"
    assert sp.main(args) == 0
    res = json.loads((tmp_path / "res" / "sp.json").read_text())
    runs = {(r["layers"], r["rule"]): r for r in res["runs"].values()}
    assert sorted(runs) == [(2, "euler"), (2, "leapfrog"), (6, "euler"), (6, "leapfrog")]  # seed 0 only
    assert all(r["phase"] == "memory" and r["tokens_budget"] == 32 for r in runs.values())
    act = {k: r["activation_mib"] for k, r in runs.items()}
    assert act[6, "leapfrog"] == pytest.approx(act[2, "leapfrog"], rel=0.01) and act[2, "leapfrog"] > 0
    assert act[6, "euler"] > 2 * act[2, "euler"]
    md = tmp_path / "res" / "sp.md"
    text = md.read_text()
    assert "## memory: one training step per size" in text
    assert (
        "Command (latest): `PYTHONPATH=. python benchmarks/scratch_parity.py --out" in text and "--phase memory" in text
    )
    assert "--zero-shot-task ''" in text  # quoted as a shell would need it
    assert f"| llama | leapfrog | {act[2, 'leapfrog']:,.1f} / " in text and "| 1.00x |" in text
    md.unlink()
    assert sp.main(args + ["--report"]) == 0 and md.read_text() == text


def test_verdict_names_the_seed_count_and_shows_a_spread_only_across_seeds():
    def run(rule, seed, loss):
        return {"phase": "final", "status": "ok", "family": "llama", "layers": 6, "rule": rule, "seed": seed,
                "settings": {"lr": 0.002}, "tokens_budget": 2e6, "val_loss": loss, "activation_mib": 16.0}  # fmt: skip

    one = {"runs": {"a": run("euler", 0, 4.0), "b": run("leapfrog", 0, 3.96)}}
    (line,) = sp.verdicts(sp.grouped(one, "final"))
    assert "leapfrog 3.9600 vs euler 4.0000 (-1.00%, 1 vs 1 seed): <= euler." in line and "±" not in line
    two = {"runs": {**one["runs"], "c": run("euler", 1, 4.2), "d": run("leapfrog", 1, 4.3)}}
    (line,) = sp.verdicts(sp.grouped(two, "final"))
    assert "leapfrog 4.1300 ± 0.2404 vs euler 4.1000 ± 0.1414 (+0.73%, 2 vs 2 seeds): within 1% of euler." in line


def test_merge_adds_runs_made_elsewhere_and_refuses_another_setup(tmp_path):
    args = _args(tmp_path, "--rules", "leapfrog", "--zero-shot-task", "", "--phase", "memory")
    assert sp.main(args) == 0
    res = tmp_path / "res" / "sp.json"
    mine = json.loads(res.read_text())
    other = dict(mine, runs={"memory-x": dict(next(iter(mine["runs"].values())), id="memory-x", layers=5)})
    other["commands"] = {"final": "the other command"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert sp.main(args + ["--merge", str(tmp_path / "other.json")]) == 0
    merged = json.loads(res.read_text())
    assert (
        set(merged["runs"]) == set(mine["runs"]) | {"memory-x"} and merged["commands"]["final"] == "the other command"
    )
    bad = dict(other, setup=dict(other["setup"], hidden=64))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(RevLLMError, match="different setup"):
        sp.main(args + ["--merge", str(tmp_path / "bad.json")])
