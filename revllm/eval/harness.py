"""Zero-shot tasks through lm-eval's ``HFLM`` wrapper, offline.

Standard tasks (piqa, arc_easy, hellaswag, winogrande, ...) resolve through lm-eval's registry and
need their data available locally (a populated HF datasets cache, or local YAMLs passed with
``include_path``). The built-in ``revllm_commonsense`` task ships with revllm (revllm/eval/tasks); its
YAML names its JSONL by a ``{{DATA_DIR}}`` placeholder, rendered into a temporary include folder here,
because lm-eval resolves ``data_files`` relative to the working directory.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import RevLLMError

TASKS_DIR = Path(__file__).parent / "tasks"


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _render_builtin(dst: Path) -> None:
    for y in TASKS_DIR.glob("*.yaml"):
        (dst / y.name).write_text(y.read_text().replace("{{DATA_DIR}}", str(TASKS_DIR.resolve())))


def run_tasks(model, tokenizer, tasks: list[str], include_path=None, batch_size: int = 4, limit=None,
              device: str | None = None, max_length: int | None = None) -> dict:
    """Run lm-eval ``tasks`` on an in-memory model; returns lm-eval's ``results`` dict (per task metrics)."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no tasks given")
    with tempfile.TemporaryDirectory(prefix="revllm-tasks-") as tmp:
        _render_builtin(Path(tmp))
        paths = [tmp] + ([str(p) for p in include_path] if include_path else [])
        for p in paths[1:]:
            if not Path(p).is_dir():
                raise FileNotFoundError(f"include path {p} is not a directory")
        # lm-eval's own registry takes ~10-50 s to index: skip it when the local folders have every task.
        tm = TaskManager(include_path=paths, include_defaults=False)
        if any(not tm.match_tasks([t]) for t in tasks):
            tm = TaskManager(include_path=paths)
        unknown = [t for t in tasks if not tm.match_tasks([t])]
        if unknown:
            raise RevLLMError(f"unknown task(s) {', '.join(unknown)}; built-in: {', '.join(builtin_tasks())}; "
                              "standard lm-eval tasks need --include-path or their local data")
        device = device or str(next(model.parameters()).device)
        kw = {"max_length": max_length} if max_length else {}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, **kw)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                          log_samples=False)
        except (ConnectionError, OSError) as e:
            raise RevLLMError(f"a task's data is not available offline ({str(e).splitlines()[0][:200]}); "
                              "put local YAML/JSONL tasks in a folder and pass --include-path") from None
    return out["results"]
