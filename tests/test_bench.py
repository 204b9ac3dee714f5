"""revllm bench on tiny configs: the saved-bytes counter, the worker's JSON, the batch search, the report
writer, and bad input. Real fresh-process spawns are few (they cost an interpreter start each)."""

import json
import statistics

import pytest

from revllm import cli
from revllm.bench import capacity, configs, memory, process, report, speed, worker
from revllm.bench.configs import Spec, build_model, make_batch, parse_bytes, parse_config, parse_ints
from revllm.errors import RevLLMError
from revllm.io import atomic_write
from revllm.memory import SavedBytes

TINY = dict(d=32, heads=4, seq=16, batch=2, vocab=64, loss_chunk=8)


def saved_bytes(config, layers):
    spec = Spec(config=config, layers=layers, **TINY)
    model = build_model(spec)
    ids = make_batch(spec)
    with SavedBytes(model) as counter:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # the saved tensors must still serve the backward
    assert all(p.grad is not None for p in model.parameters())
    return counter.bytes


def test_saved_bytes_memory_free_is_small_and_flat_in_depth():
    stored = {L: saved_bytes("midpoint_stored", L) for L in (2, 8)}
    free = {L: saved_bytes("midpoint", L) for L in (2, 8)}
    ckpt = {L: saved_bytes("euler_ckpt", L) for L in (2, 8)}
    assert free[8] == free[2]  # what the Function saves does not depend on depth
    assert stored[8] > 3.5 * stored[2] - stored[2]  # grows linearly with depth (plus a constant head)
    assert free[8] * 5 < stored[8]
    # checkpointing keeps one pair of layer inputs per layer: between the two, growing with depth
    assert free[8] < ckpt[8] < stored[8] and ckpt[8] > ckpt[2]


def test_saved_bytes_excludes_parameters():
    spec = Spec(config="hamiltonian", layers=3, **TINY)
    model = build_model(spec)
    counter = SavedBytes(model)
    w = next(model.parameters())
    counter._pack(w)
    assert counter.bytes == 0 and counter.tensors == 1


def test_worker_prints_one_json_line(capsys):
    job = {"task": "memory", **Spec(config="leapfrog", layers=2, **TINY).to_dict()}
    assert worker.main([json.dumps(job)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(worker.PREFIX)]
    assert len(lines) == 1
    res = json.loads(lines[0][len(worker.PREFIX) :])
    assert res["ok"] and res["config"] == "leapfrog" and res["saved_bytes"] > 0 and res["peak_bytes"] > 0


def test_worker_refuses_budget_below_model(capsys):
    job = {"task": "probe", **Spec(config="euler", layers=1, **TINY).to_dict(), "budget_bytes": 2**20}
    res = worker.run(job)
    assert not res["ok"] and res["reason"] == "model_over_budget" and "budget" in res["detail"]


def test_worker_unknown_task_reports_error(capsys):
    worker.main([json.dumps({"task": "nope", **Spec(layers=1, **TINY).to_dict()})])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1][len(worker.PREFIX) :])
    assert res == {
        "ok": False,
        "reason": "error",
        "detail": "ValueError: unknown task 'nope'; use memory, probe or throughput",
    }


@pytest.mark.slow
def test_spawn_runs_a_fresh_process_and_a_budgeted_probe():
    spec = Spec(config="midpoint", layers=2, **TINY).to_dict()
    res = process.spawn({"task": "probe", **spec, "budget_bytes": 8 * 2**30}, timeout=300)
    assert res["ok"] and res["step_seconds"] > 0 and res["peak_bytes"] < 8 * 2**30
    # A budget between the model's resident size and its step: the step must fail, not the machine.
    res = process.spawn(
        {"task": "probe", **spec, "batch": 512, "seq": 64, "budget_bytes": res["rss_before_bytes"] + 64 * 2**20},
        timeout=300,
    )
    assert not res["ok"] and res["reason"] in ("oom", "over_budget")


@pytest.mark.parametrize("limit", [1, 5, 37, 64, 1000])
def test_search_max_batch_doubling_then_bisection(limit):
    calls = []

    def probe(b):
        calls.append(b)
        return b <= limit

    best, trace, capped = capacity.search_max_batch(probe, start=1, cap=4096)
    assert best == limit and not capped
    doubling = [c for c in calls if c & (c - 1) == 0][: len(bin(limit)) - 1]
    assert calls[: len(doubling)] == [2**i for i in range(len(doubling))]
    assert len(calls) <= 2 * len(bin(limit)) + 1 and trace == [(c, c <= limit) for c in calls]


def test_search_max_batch_edges():
    assert capacity.search_max_batch(lambda b: False, start=1)[0] == 0
    assert capacity.search_max_batch(lambda b: b <= 3, start=8)[0] == 3  # start too big: bisect down
    best, _, capped = capacity.search_max_batch(lambda b: True, start=1, cap=100)
    assert best == 100 and capped
    best, trace, _ = capacity.search_max_batch(lambda b: b <= 700, start=1, tolerance=0.25)
    exact = capacity.search_max_batch(lambda b: b <= 700, start=1)
    assert exact[0] == 700 and 0.75 * 700 <= best <= 700 and len(trace) < len(exact[1]) - 4
    with pytest.raises(ValueError):
        capacity.search_max_batch(lambda b: True, start=0)


def fake_worker(job, timeout=None):
    """Saved bytes linear in depth for stored configs, flat for memory-free ones; no process spawned."""
    L, mf = job["layers"], configs.parse_config(job["config"])[1]
    if job.get("task") == "probe":
        limit = 40 if mf else 5
        return {**job, "ok": job["batch"] <= limit, "reason": None if job["batch"] <= limit else "oom"}
    if job.get("task") == "throughput":
        return {**job, "ok": True, "tokens_per_s": 1000.0 * job["batch"] / (job["batch"] + (8 if mf else 1))}
    saved = 2**20 if mf else L * 2**22
    return {
        **job,
        "ok": True,
        "saved_bytes": saved,
        "peak_bytes": 2**28 + saved,
        "peak_step_bytes": saved,
        "rss_before_bytes": 2**28,
    }


def test_memory_table_skips_rows_predicted_over_budget_and_report_writes(tmp_path):
    base = Spec(**TINY)
    res = memory.memory_table(["euler", "midpoint"], [2, 4, 64], base, budget=3 * 2**27, worker=fake_worker)
    rows = {(r["config"], r["layers"]): r for r in res["rows"]}
    assert rows[("euler", 64)]["reason"] == "predicted_memory" and not rows[("euler", 64)]["ok"]
    assert rows[("midpoint", 64)]["ok"]
    paths = report.save(res, tmp_path)
    assert [p.name for p in paths] == ["memory_cpu.json", "memory_cpu.md", "memory_cpu.png"]
    md = paths[1].read_text()
    assert "| (a) euler |" in md and "skipped: predicted_memory" in md and "| midpoint (L=2->64) | 1.000 |" in md
    assert report.load(paths[0])["rows"] == json.loads(json.dumps(res["rows"]))
    (tmp_path / "memory_cpu.md").unlink()
    assert any(p.name == "memory_cpu.md" for p in report.rebuild(tmp_path))


def test_capacity_table_with_fake_probe_and_paper_column(tmp_path):
    res = capacity.capacity_table(
        ["euler", "euler_ckpt", "midpoint"], [16], Spec(**TINY), budget=2**30, worker=fake_worker
    )
    best = {r["config"]: r["max_batch"] for r in res["rows"]}
    assert best == {"euler": 5, "euler_ckpt": 5, "midpoint": 40}
    mid = next(r for r in res["rows"] if r["config"] == "midpoint")
    assert mid["vs_a"] == pytest.approx(100 * ((40 / 48) / (5 / 6) - 1))
    md = report.render_markdown(res)
    assert "+20.7%" in md and "| 16 | (c) midpoint | 1,024.0 | 40 |" in md


def test_capacity_budget_too_small_is_an_error():
    def tiny_budget(job, timeout=None):
        return {**job, "ok": False, "reason": "model_over_budget", "detail": "the model alone takes 300 MiB RSS"}

    with pytest.raises(RevLLMError, match="too small for euler at 16 layers"):
        capacity.capacity_table(["euler"], [16], Spec(**TINY), budget=2**20, worker=tiny_budget)


def test_speed_table_interleaved_ratio(tmp_path):
    res = speed.speed_table(["euler", "midpoint"], [2], Spec(layers=2, **TINY), repeats=2, warmup=1)
    rows = {r["config"]: r for r in res["rows"]}
    assert len(rows["midpoint"]["times"]) == 2 == len(rows["euler"]["times"])
    # each ratio is the row's median step time over baseline (a)'s median, from the interleaved timings
    med = {c: statistics.median(r["times"]) for c, r in rows.items()}
    assert rows["midpoint"]["median_s"] == med["midpoint"]
    assert rows["midpoint"]["ratio_to_a"] == pytest.approx(med["midpoint"] / med["euler"], rel=1e-12)
    assert rows["midpoint"]["tokens_per_s"] == pytest.approx(2 * TINY["seq"] / med["midpoint"], rel=1e-12)
    assert [p.name for p in report.save(res, tmp_path)] == ["speed_cpu.json", "speed_cpu.md"]


def test_parsers():
    assert parse_config("euler_ckpt") == ("euler", False, True)
    assert parse_config("hamiltonian_stored") == ("hamiltonian", False, False)
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1000") == 1000
    for bad in ("4 apples", "-1G", "0"):
        with pytest.raises(RevLLMError):
            parse_bytes(bad)
    with pytest.raises(RevLLMError, match="unknown configuration 'euler_stored'"):
        parse_config("euler_stored")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["bench", "memory", "--configs", "euler,nope"], "unknown configuration 'nope'"),
        (["bench", "capacity", "--device", "cpu"], "--memory-budget is required on CPU"),
        (["bench", "capacity", "--memory-budget", "lots"], "cannot read memory size 'lots'"),
        (["bench", "speed", "--batch", "0"], "--batch must be positive integers"),
        (["bench", "memory", "--heads", "7"], "--heads 7 must divide --d 512"),
        (["bench", "report", "--results", "/nonexistent/dir"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("revllm bench: error:")


def test_report_refuses_non_result_json(tmp_path):
    (tmp_path / "memory_cpu.json").write_text('{"hello": 1}')
    with pytest.raises(RevLLMError, match="not a revllm bench result"):
        report.rebuild(tmp_path)
    (tmp_path / "memory_cpu.json").write_text("{broken")
    with pytest.raises(RevLLMError, match="not valid JSON"):
        report.load(tmp_path / "memory_cpu.json")


def test_merge_unites_parallel_runs_and_refuses_other_shapes(tmp_path):
    a = memory.memory_table(["euler"], [2, 4], Spec(**TINY), worker=fake_worker)
    b = memory.memory_table(["midpoint"], [2, 8], Spec(**TINY), worker=fake_worker)
    m = report.merge([a, b])
    assert [(r["config"], r["layers"]) for r in m["rows"]] == [
        ("euler", 2),
        ("euler", 4),
        ("midpoint", 2),
        ("midpoint", 8),
    ]
    assert m["setup"]["depths"] == [2, 4, 8] and m["name"] == "memory"
    assert "| (c) midpoint | 1.0 |  | 1.0 |" in report.render_markdown(m)
    other = memory.memory_table(["midpoint"], [2], Spec(**{**TINY, "seq": 32}), worker=fake_worker)
    with pytest.raises(RevLLMError, match="different seq"):
        report.merge([a, other])


def test_merge_keeps_the_name_and_report_never_rewrites_a_json(tmp_path):
    a = {**memory.memory_table(["euler"], [2], Spec(**TINY), worker=fake_worker), "name": "sweep"}
    b = {**memory.memory_table(["midpoint"], [2], Spec(**TINY), worker=fake_worker), "name": "sweep"}
    assert report.merge([a, b])["name"] == "sweep"
    other = {**a, "rows": [{**a["rows"][0], "saved_bytes": 12345}]}
    atomic_write(tmp_path / "memory_cpu_old.json", json.dumps(other))
    report.save(a, tmp_path)  # sweep_<tag>.json
    before = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    report.rebuild(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.glob("*.json")} == before  # nothing renamed or overwritten
    assert (tmp_path / "memory_cpu_old.md").is_file()


def test_parse_ints_sorts_and_refuses_repeats():
    assert parse_ints("12,6,24", "--depths") == [6, 12, 24]
    with pytest.raises(RevLLMError, match="lists a value twice"):
        parse_ints("6,6,12", "--depths")


def test_capacity_resume_refuses_another_setup(tmp_path, capsys):
    prev = capacity.capacity_table(["euler"], [2], Spec(**TINY), budget=2**30, worker=fake_worker)
    atomic_write(tmp_path / "prev.json", json.dumps(prev))
    argv = [
        "bench",
        "capacity",
        "--configs",
        "euler",
        "--depths",
        "2",
        "--d",
        str(TINY["d"] * 2),
        "--heads",
        str(TINY["heads"]),
        "--seq",
        str(TINY["seq"]),
        "--vocab",
        str(TINY["vocab"]),
        "--memory-budget",
        "1GiB",
        "--resume",
        str(tmp_path / "prev.json"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "was measured with another d" in err and not (tmp_path / "o").exists()


def test_capacity_resume_reuses_finished_search_and_measures_missing_throughput():
    calls = []

    def counting(job, timeout=None):
        calls.append(job["task"])
        return fake_worker(job, timeout)

    prev = [{"config": "midpoint", "layers": 16, "max_batch": 40, "capped": False, "probes": [], "tokens_per_s": None}]
    res = capacity.capacity_table(["midpoint"], [16], Spec(**TINY), budget=2**30, worker=counting, resume_rows=prev)
    assert calls == ["throughput"] and res["rows"][0]["max_batch"] == 40 and res["rows"][0]["tokens_per_s"] > 0
    prev = [{**prev[0], "config": "euler", "max_batch": 5}, prev[0]]
    res = capacity.capacity_table(["euler", "midpoint"], [16], Spec(**TINY), worker=counting, resume_rows=prev)
    assert res["rows"][1]["vs_a"] == pytest.approx(100 * ((40 / 48) / (5 / 6) - 1))


def test_atomic_write_leaves_no_temp_and_a_readable_file(tmp_path):
    import os
    import stat

    target = tmp_path / "r" / "t.json"
    atomic_write(target, '{"a": 1}\n')
    atomic_write(target, '{"a": 2}\n')  # replaces
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["t.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_every_table_has_its_renderer():
    assert set(report._RENDERERS) == set(report.TABLES)
