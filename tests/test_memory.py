"""revllm.memory: the allocator setting is applied where users run, respects the user, and has its effect."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from revllm import memory

ROOT = Path(__file__).resolve().parents[1]
GLIBC = memory._glibc() is not None


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(memory, "_state", {})


def _env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD", memory.OPT_OUT_ENV))
    }
    return {**env, "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_applied_on_glibc_once(fresh_state):
    first = memory.configure_allocator(env={})
    assert first["applied"] and "mmap threshold 128 KiB" in first["reason"]
    assert memory.configure_allocator(env={memory.OPT_OUT_ENV: "0"}) == first  # once per process
    assert memory.allocator_state() == first


@pytest.mark.parametrize(
    "env, why",
    [
        ({memory.OPT_OUT_ENV: "0"}, "REVLLM_ALLOCATOR_TUNING=0"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_ is set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "GLIBC_TUNABLES is set"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
    ],
)
def test_the_users_own_setting_wins(fresh_state, env, why):
    state = memory.configure_allocator(env=env)
    assert not state["applied"] and why in state["reason"]


def test_not_glibc_is_a_no_op(fresh_state, monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    state = memory.configure_allocator(env={})
    assert not state["applied"] and "not glibc" in state["reason"]


# Freed large blocks: glibc's dynamic threshold (raised by the first free of a 4 MiB mmapped block) puts the
# next 2 MiB blocks on the heap, where the small blocks allocated between them and kept pin them: RSS stays
# up after they are freed. With the fixed threshold each block is its own mapping and goes back on free. This is
# the per-layer recompute-and-free pattern of the memory-free backward in miniature.
PATTERN = textwrap.dedent("""
    import ctypes, sys
    from revllm import memory
    if sys.argv[1] == "revllm":
        assert memory.configure_allocator()["applied"]
    libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]; libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    def touch(n):
        p = libc.malloc(n); libc.memset(p, 1, n); return p
    libc.free(touch(4 << 20))
    base = memory.rss_bytes()
    blocks, pins = [], []
    for _ in range(64):  # each block followed by a small one that stays (64 KiB: from the heap either way)
        blocks.append(touch(2 << 20))
        pins.append(touch(64 << 10))
    for b in blocks:
        libc.free(b)
    print((memory.rss_bytes() - base) / 2**20)
""")


def _held_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, env=_env(), check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_the_setting_returns_freed_blocks_to_the_system():
    system, tuned = _held_after_free("system"), _held_after_free("revllm")
    assert system > 100  # 128 MiB allocated and freed, still resident with glibc's default
    # (the 4 MiB of small blocks stay either way)
    assert tuned < 16, f"{tuned:.1f} MiB still resident after free with the fixed threshold"


def test_training_entry_applies_it(monkeypatch, tmp_path):
    from revllm.errors import RevLLMError
    from revllm.train import loop
    from revllm.train.config import TrainConfig

    calls = []
    monkeypatch.setattr(loop, "configure_allocator", lambda: calls.append(1))
    with pytest.raises((RevLLMError, ValueError)):
        loop.train(TrainConfig(data=str(tmp_path / "none"), out=str(tmp_path / "run"), seq_len=1))
    assert calls == [1]  # before anything else: the API's train(), revllm train, finetune and convert --distill


def test_cli_applies_it_and_the_flag_opts_out(monkeypatch, tmp_path, capsys):
    from revllm import cli

    calls = []
    monkeypatch.setattr(cli, "configure_allocator", lambda: calls.append(os.environ.get(memory.OPT_OUT_ENV)))
    monkeypatch.delenv(memory.OPT_OUT_ENV, raising=False)
    assert cli.main(["bench", "report", "--results", str(tmp_path / "none")]) == 2
    assert calls == [None]
    assert cli.main(["--no-allocator-tuning", "bench", "report", "--results", str(tmp_path / "none")]) == 2
    assert calls[-1] == "0"  # configure_allocator then leaves malloc alone, here and in child processes
    monkeypatch.delenv(memory.OPT_OUT_ENV, raising=False)


def test_peak_reset_and_peak():
    import numpy as np

    a = np.ones(40_000_000 // 8)  # 40 MB touched
    high = memory.peak_rss_bytes()
    del a
    if not memory.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    assert memory.peak_rss_bytes() <= high - 30_000_000
    assert memory.peak_memory("cpu")["peak_rss_bytes"] == memory.peak_rss_bytes()


def test_allocator_table_runs_each_setting_under_its_environment():
    from revllm.bench.allocator import allocator_table
    from revllm.bench.configs import Spec

    seen = []

    def worker(job, env):
        seen.append((job["layers"], job["allocator"], env))
        return {"ok": True, "peak_bytes": 100 * job["layers"], "rss_before_bytes": 10}

    tun = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
    res = allocator_table(
        ["midpoint"],
        [4, 8],
        Spec(d=8, heads=2),
        1,
        {"je": "/x/je.so"},
        settings={"mmap1m": tun},
        threads=1,
        worker=worker,
    )
    assert res["setup"]["allocators"] == ["system", "revllm", "je", "mmap1m"]
    assert res["setup"]["settings"] == {"mmap1m": tun}
    one = {"OMP_NUM_THREADS": "1"}
    assert seen[:4] == [
        (4, "system", one),
        (4, "revllm", one),
        (4, "system", {"LD_PRELOAD": "/x/je.so", **one}),
        (4, "system", {**tun, **one}),  # glibc's own tunable, revllm's setting not applied on top
    ]
    assert [r["growth_bytes"] for r in res["rows"]] == [390] * 4 + [790] * 4


@pytest.mark.parametrize(
    "bad, why",
    [
        ("mmap1m", "give NAME=MALLOC_VAR"),
        ("mmap1m=LD_PRELOAD=/x.so", "give NAME=MALLOC_VAR"),
        ("mmap1m=MALLOC_MMAP_THRESHOLD_=", "give NAME=MALLOC_VAR"),
        ("revllm=MALLOC_MMAP_THRESHOLD_=1", "already used"),
    ],
)
def test_allocator_setting_flag_refuses_bad_input(bad, why, tmp_path, capsys):
    from revllm import cli

    code = cli.main(["bench", "allocator", "--setting", bad, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and why in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before any row ran
