"""revllm bench finetune (driver logic with a stand-in worker) and the demo's table and closing line."""

import json

import pytest

from revllm.bench import finetune as ft


def _fake_worker(peaks, calls, fail_from=None):
    """A worker that 'measures' peak = peaks[config] * tokens; fails as oom from ``fail_from`` tokens on."""

    def worker(job, timeout=None, env=None):
        calls.append(job)
        tokens = job["seq"] * job["batch"]
        if fail_from and tokens >= fail_from:
            return {**job, "ok": False, "reason": "oom", "detail": "can't allocate"}
        peak = peaks[job["config"]] * tokens
        return {
            **job,
            "ok": True,
            "peak_bytes": peak,
            "load_peak_bytes": 1,
            "s_per_step": 1.0,
            "tokens_per_s": float(tokens),
            "step_times": [1.0],
        }

    return worker


def test_plan_runs_short_shapes_first_and_covers_both_sweeps():
    rows = ft.plan(["hf", "leapfrog"], ["lora"], [512, 2048], [1, 4])
    shapes = [(r["seq"], r["batch"]) for r in rows]
    # the batch sweep is at 1,024 tokens (batch 1 there too); shapes ordered by tokens per step
    assert shapes == [(512, 1)] * 2 + [(1024, 1)] * 2 + [(2048, 1)] * 2 + [(1024, 4)] * 2


def test_a_failure_skips_larger_shapes_and_resume_reuses_rows(tmp_path):
    calls = []
    worker = _fake_worker({"hf": 10, "leapfrog": 1}, calls, fail_from=2048)
    plan = ft.plan(["hf"], ["lora"], [512, 2048, 8192], [1])
    first = ft.finetune_table(plan, worker=worker)
    reasons = [r.get("reason") for r in first["rows"]]
    assert reasons == [None, "oom", "skipped"] and len(calls) == 2  # 8192 never ran
    calls.clear()
    again = ft.finetune_table(
        ft.plan(["hf", "leapfrog"], ["lora"], [512], [1]), resume_rows=first["rows"], worker=worker
    )
    assert [c["config"] for c in calls] == ["leapfrog"]  # hf at 512 was reused, not measured again
    assert {(r["config"], r["seq"]) for r in again["rows"]} >= {("hf", 512), ("hf", 2048), ("leapfrog", 512)}


def test_fits_uses_the_measured_peak_with_loading():
    rows = [
        dict(config="hf", mode="lora", seq=s, batch=1, ok=True, peak_bytes=s * 2**20, load_peak_bytes=0)
        for s in (512, 2048)
    ]
    rows += [
        dict(config="hf", mode="lora", seq=1024, batch=b, ok=True, peak_bytes=b * 2**30, load_peak_bytes=0)
        for b in (2, 4)
    ]
    rows += [dict(config="hf", mode="lora", seq=4096, batch=1, ok=True, peak_bytes=10, load_peak_bytes=2**40)]
    assert ft.fits(rows, 3 * 2**30)[("hf", "lora")] == {"seq": 2048, "batch": 2}


def test_too_small_a_limit_is_one_clear_error():
    def worker(job, timeout=None, env=None):
        return {**job, "ok": False, "reason": "model_over_budget", "detail": "the model alone takes 900 MiB RSS"}

    from revllm.errors import RevLLMError

    with pytest.raises(RevLLMError, match="too small for batch 1: the model alone takes 900 MiB"):
        ft.finetune_table(ft.plan(["hf"], ["lora"], [512], [1]), limit=2**28, worker=worker)


def test_cli_refuses_a_sequence_beyond_the_positions_before_loading(monkeypatch, tmp_path, capsys):
    from revllm.cli import main

    monkeypatch.setattr(ft, "max_positions", lambda: 8192)  # (read from the GGUF's metadata in real use)
    monkeypatch.setattr(ft, "converted_dir", lambda c: pytest.fail("weights were touched"))
    monkeypatch.setattr(ft, "finetune_table", lambda *a, **k: pytest.fail("rows were run"))
    assert main(["bench", "finetune", "--seqs", "512,16384", "--out", str(tmp_path)]) == 2
    assert "sequence length 16384 exceeds SmolLM2's 8192 positions" in capsys.readouterr().err
    assert main(["bench", "finetune", "--configs", "hf,gpt5", "--out", str(tmp_path)]) == 2
    assert "unknown configuration gpt5" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_resume_refuses_another_table(tmp_path):
    from revllm.errors import RevLLMError

    p = tmp_path / "finetune_cpu.json"
    p.write_text(json.dumps({"table": "memory", "rows": []}))
    with pytest.raises(RevLLMError, match="memory table, not finetune"):
        ft.load_resume(p)


def test_demo_table_and_closing_line(tmp_path):
    from rich.console import Console

    from revllm.commands.demo import closing_line, comparison_table

    runs = [tmp_path / n for n in ("midpoint", "euler", "euler_ckpt")]
    summaries = [
        dict(memory_free=True, steps=40, val_loss=6.1, tokens_per_s=900, activation_mb=2.5, peak_mb=900),
        dict(memory_free=False, steps=40, val_loss=6.0, tokens_per_s=1000, activation_mb=700, peak_mb=1800),
        dict(memory_free=False, steps=40, val_loss=6.0, tokens_per_s=800, activation_mb=40, peak_mb=1000),
    ]
    console = Console(record=True, width=200)
    console.print(comparison_table(runs, summaries))
    text = console.export_text()
    assert "0.50x" in text and "checkpointing" in text and "memory-free" in text
    line = closing_line(runs, summaries)
    assert "peak of 900 MB instead of 1,800 MB (0.50x)" in line and "checkpointing" in line
