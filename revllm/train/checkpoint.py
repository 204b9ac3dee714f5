"""Training checkpoints: safetensors weights + JSON state, written atomically, verified on load.

Layout of ``RUN/checkpoints/step_XXXXXXXX/``::

    model/                       save_pretrained (safetensors) + the tokenizer: a plain HF model dir
    trainer_state.safetensors    optimizer tensors ("optim.<param index>.<name>"), RNG states as uint8
    trainer_state.json           step, tokens, scheduler, optimizer param groups, sampler state, config
    manifest.json                sha256 of every other file -- written LAST (``revllm.io.write_manifest``)

The directory is built under a temporary name and moved into place (``revllm.io.replace_dir``), so a crash
or a full disk never leaves a half-written ``step_*``; a directory without a valid manifest is refused
(``CheckpointError``) and ``latest_good`` skips it with one plain line on stderr. The temporary name
carries the writer's host and pid, so ``remove_stale_temps`` (run at the start of training) removes
only what dead writers left. Nothing is ever unpickled; weights that are not finite are never saved
and never loaded (``revllm.io.nonfinite``). Reading models back (``load_model``) is ``revllm.io``'s.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from ..errors import CheckpointError
from ..io import PREFIX, list_checkpoints, replace_dir, verify, write_manifest


def optimizer_tensors(optimizer) -> list:
    return [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]


# -- stale temporary directories ----------------------------------------------------------------
def _temp_name(kind: str, name: str) -> str:
    return f".{kind}-{name}-{socket.gethostname()}-{os.getpid()}"


def _writer_alive(dirname: str) -> bool:
    """Whether the writer named by a ``.tmp-``/``.old-`` directory may still be running. Names carry
    ``HOST-PID`` (older ones just ``PID``, taken as this host); another host's writer cannot be checked
    from here, so it counts as alive."""
    parts = dirname.split("-")
    pid, host = parts[-1], "-".join(parts[3:-1]) or socket.gethostname()
    if not pid.isdigit() or host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(run: Path) -> list[str]:
    """Remove the ``.tmp-*`` / ``.old-*`` directories that dead writers on this host left in
    RUN/checkpoints (a crash or a full disk during a save); a live writer's are never touched."""
    root = Path(run) / "checkpoints"
    removed = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and d.name.startswith((".tmp-", ".old-")) and not _writer_alive(d.name):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    return removed


# -- saving -------------------------------------------------------------------------------------
def _optimizer_to_flat(opt_state: dict) -> tuple[dict, list]:
    tensors = {}
    for idx, st in opt_state["state"].items():
        for name, v in st.items():
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            tensors[f"optim.{idx}.{name}"] = v.detach().cpu().contiguous()
    return tensors, opt_state["param_groups"]


def _optimizer_from_flat(tensors: dict, groups: list) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, rng: dict, keep_last: int = 0
) -> Path:
    """Write ``RUN/checkpoints/step_<step>`` atomically; keep the newest ``keep_last`` (0 = all)."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / _temp_name("tmp", final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        hf_logging.disable_progress_bar()  # the training bar is the one progress display
        model.save_pretrained(tmp / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        tensors, groups = _optimizer_to_flat(optimizer.state_dict())
        for name, t in rng.items():
            tensors[f"rng.{name}"] = t.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "trainer_state.safetensors"))
        meta = dict(state, step=step, scheduler=scheduler.state_dict(), param_groups=groups)
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        write_manifest(tmp)
        # re-saving the same step: the old one is moved aside, never deleted first
        replace_dir(tmp, final, old=root / _temp_name("old", final.name))
    except (OSError, SafetensorError) as e:  # a full disk reaches us as either (safetensors' own error type)
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(
            f"could not save checkpoint step {step} ({why}); earlier checkpoints are untouched"
        ) from None
    if keep_last > 0:
        # Prune only up to the one just written: newer ones (a resumed run's abandoned future, possibly
        # the corrupted step it resumed around) must not push the good ones out.
        upto = [c for c in list_checkpoints(run) if c.name <= final.name]
        for old in upto[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def load_trainer_state(ckpt: Path) -> tuple[dict, dict, dict]:
    """(trainer_state.json dict, optimizer state_dict, rng tensors) of a verified checkpoint."""
    ckpt = verify(ckpt)
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    tensors = load_file(str(ckpt / "trainer_state.safetensors"))
    opt = _optimizer_from_flat(tensors, meta.pop("param_groups"))
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    return meta, opt, rng
