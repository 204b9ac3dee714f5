"""The driver's side of a measurement: run one job in a fresh interpreter (``revllm.bench.worker``) and read
back its one JSON line. A fresh process per row keeps one row's allocator state and RSS high-water mark
out of the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PREFIX = "REVLLM_BENCH_JSON "  # the worker's result line starts with it (its other output is the child's own)


def spawn(job: dict, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run ``job`` in a fresh interpreter; returns its JSON (``ok=False`` with a reason on crash/timeout)."""
    env = {**os.environ, **(env or {})}
    root = str(Path(__file__).resolve().parents[2])  # the checkout holding this revllm package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "revllm.bench.worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**job, "ok": False, "reason": "timeout", "detail": f"over --max-seconds {timeout:g}"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PREFIX):
            res = json.loads(line[len(PREFIX) :])
            return {**job, **res}
    tail = " ".join(proc.stderr.split()[-40:])
    return {**job, "ok": False, "reason": f"crash (exit {proc.returncode})", "detail": tail[-300:]}
