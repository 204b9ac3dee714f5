"""Zero-shot tasks through lm-eval's ``HFLM`` wrapper, offline.

Standard tasks (piqa, arc_easy, hellaswag, winogrande, ...) resolve through lm-eval's registry and
need their data available locally: a populated HF datasets cache, local YAMLs passed with
``include_path``, or ``task_data``, a folder of ``{task}.jsonl`` files (the validation split in the
dataset's own fields) on which lm-eval's own task configs run unchanged (prompts, preprocessing, metrics). The built-in ``revllm_commonsense`` task ships with revllm (revllm/eval/tasks); its
YAML names its JSONL by a ``{{DATA_DIR}}`` placeholder, rendered into a temporary include folder here,
because lm-eval resolves ``data_files`` relative to the working directory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from ..errors import RevLLMError

TASKS_DIR = Path(__file__).parent / "tasks"


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _render_builtin(dst: Path) -> None:
    for y in TASKS_DIR.glob("*.yaml"):
        # The placeholder sits inside a double-quoted YAML string: escape the path as JSON does (a valid
        # YAML double-quoted escape), so a folder name with " or \ still parses.
        (dst / y.name).write_text(y.read_text().replace("{{DATA_DIR}}", json.dumps(str(TASKS_DIR.resolve()))[1:-1]))


# lm-eval's own configs of the standard zero-shot tasks (relative to lm_eval/tasks).
STANDARD_TASKS = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
}


def _render_local_standard(dst: Path, tasks: list[str], data_dir) -> None:
    """For each standard task, a YAML that includes lm-eval's own config and only swaps the dataset for
    ``data_dir/{task}.jsonl``. Its ``!function`` hooks resolve next to the included file, as usual."""
    import lm_eval  # optional (the eval extra), as in run_tasks

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"task data folder {data_dir} is not a directory")
    chosen = [t for t in tasks if t in STANDARD_TASKS]
    if not chosen:
        raise RevLLMError(f"--task-data serves the standard tasks {', '.join(STANDARD_TASKS)}; none was asked for")
    root = Path(lm_eval.__file__).parent / "tasks"
    for t in chosen:
        f = data_dir / f"{t}.jsonl"
        if not f.is_file():
            raise RevLLMError(
                f"{data_dir} has no {t}.jsonl (the task's validation split, one document per line, "
                "in the dataset's own fields)"
            )
        cfg = {
            "include": str(root / STANDARD_TASKS[t]),
            "task": t,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(f.resolve())}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
        }
        (dst / f"{t}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    include_path=None,
    batch_size: int = 4,
    limit=None,
    device: str | None = None,
    max_length: int | None = None,
    task_data=None,
) -> dict:
    """Run lm-eval ``tasks`` on an in-memory model; returns lm-eval's ``results`` dict (per task metrics).
    ``task_data``: a folder of ``{task}.jsonl`` for the standard tasks (see the module docstring).
    The model is in memory (nothing is fetched for it); whether datasets may reach a hub is the caller's
    setting (``HF_DATASETS_OFFLINE``): ``revllm eval`` runs offline, a library call leaves the
    environment as it is."""
    # lm-eval is optional (the eval extra) and slow to import: only running tasks needs it
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no tasks given")
    with tempfile.TemporaryDirectory(prefix="revllm-tasks-") as tmp:
        _render_builtin(Path(tmp))
        if task_data is not None:
            _render_local_standard(Path(tmp), list(tasks), task_data)
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
            raise RevLLMError(
                f"unknown task(s) {', '.join(unknown)}; built-in: {', '.join(builtin_tasks())}; "
                "standard lm-eval tasks need their local data (--task-data or --include-path)"
            )
        device = device or str(next(model.parameters()).device)
        kw = {"max_length": max_length} if max_length else {}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, **kw)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, log_samples=False)
        except (ConnectionError, OSError) as e:
            raise RevLLMError(
                f"a task's data is not available offline ({str(e).splitlines()[0][:200]}); "
                "put local YAML/JSONL tasks in a folder and pass --include-path"
            ) from None
    return out["results"]
