"""Checkpoints: safetensors weights + JSON state, written atomically, verified on load.

Layout of ``RUN/checkpoints/step_XXXXXXXX/``::

    model/                       save_pretrained (safetensors) + the tokenizer: a plain HF model dir
    trainer_state.safetensors    optimizer tensors ("optim.<param index>.<name>"), RNG states as uint8
    trainer_state.json           step, tokens, scheduler, optimizer param groups, sampler state, config
    manifest.json                sha256 of every other file -- written LAST

The directory is built under a temporary name and ``os.replace``-d into place, so a crash or a full
disk never leaves a half-written ``step_*``; a directory without a valid manifest is refused
(``CheckpointError``) and ``latest_good`` skips it with one plain line on stderr. The temporary name
carries the writer's host and pid, so ``remove_stale_temps`` (run at the start of training) removes
only what dead writers left. Nothing is ever unpickled; weights that are not finite are never saved
and never loaded (``nonfinite``).

``load_model(path)`` / ``load_tokenizer(path)`` accept a run dir (its latest good checkpoint), a
checkpoint dir, or any HF model dir; generate/eval/bench use them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, RevLLMError, read_json

MANIFEST = "manifest.json"
PREFIX = "step_"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> None:
    entries = {str(p.relative_to(root)): _sha256(p) for p in _files(root)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST)


def verify(ckpt: Path) -> Path:
    """Raise CheckpointError unless every file listed in the manifest is present and intact."""
    ckpt = Path(ckpt)
    entries = read_json(ckpt / MANIFEST, f"checkpoint {ckpt} is incomplete (no {MANIFEST}); refusing it", CheckpointError)
    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"checkpoint {ckpt} is corrupted: its {MANIFEST} lists no files; refusing it")
    # every file must be covered: a manifest that leaves one out would let that file change unnoticed
    unlisted = [str(p.relative_to(ckpt)) for p in _files(ckpt) if str(p.relative_to(ckpt)) not in entries]
    if unlisted:
        raise CheckpointError(f"checkpoint {ckpt} is corrupted: {unlisted[0]} is not in its {MANIFEST}; refusing it")
    for rel, digest in entries.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {rel} is missing; refusing it")
        if _sha256(p) != digest:
            raise CheckpointError(f"checkpoint {ckpt} is corrupted: {rel} does not match its sha256; refusing it")
    return ckpt


def list_checkpoints(run: Path) -> list[Path]:
    d = Path(run) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit())


def say(msg: str) -> None:
    """One plain line on stderr that does not glue itself to a running progress bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def latest_good(run: Path, action: str = "resuming from") -> Path | None:
    """Newest checkpoint that verifies; each bad one is skipped (never deleted) with one plain line,
    ``checkpoint step_N is corrupted (reason); <action> step_M``."""
    skipped = []
    good = None
    for ckpt in reversed(list_checkpoints(run)):
        try:
            good = verify(ckpt)
            break
        except CheckpointError as e:
            reason = str(e).replace(f"checkpoint {ckpt} is ", "").removesuffix("; refusing it").removeprefix("corrupted: ")
            skipped.append(f"checkpoint {ckpt.name} is corrupted ({reason})")
    for line in skipped:
        say(f"{line}; " + (f"{action} {good.name}" if good else "no good checkpoint is left"))
    return good


def nonfinite(tensors) -> int:
    """How many of ``tensors`` hold a NaN or an inf. Screened by one fused reduction (``torch._foreach_norm``,
    ord 2: NaN and inf propagate; on CPU it is ~8x faster than ord inf) and one sync per device; a norm
    that is not finite (a NaN/inf, or squares of huge finite values overflowing) is then confirmed with
    ``isfinite`` on that tensor alone, so the count is exact. DTensors (FSDP2 shards): the local shard."""
    local = [getattr(t, "_local_tensor", t).detach() for t in tensors]
    local = [t for t in local if t.numel() and t.is_floating_point()]
    if not local:
        return 0
    by_device: dict = {}
    for t, n in zip(local, torch._foreach_norm(local, 2)):
        by_device.setdefault(n.device, ([], []))
        by_device[n.device][0].append(t)
        by_device[n.device][1].append(n.float())
    bad = 0
    for ts, ns in by_device.values():
        flagged = (~torch.stack(ns).isfinite()).nonzero().flatten().tolist()  # the sync; usually empty
        bad += sum(not bool(torch.isfinite(ts[i]).all()) for i in flagged)
    return bad


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


def save_checkpoint(run: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, rng: dict,
                    keep_last: int = 0) -> Path:
    """Write ``RUN/checkpoints/step_<step>`` atomically; keep the newest ``keep_last`` (0 = all)."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / _temp_name("tmp", final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        from transformers.utils import logging as hf_logging

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
        if final.exists():  # re-saving the same step: move the old one aside, never delete it first
            old = root / _temp_name("old", final.name)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
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
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return meta, opt, rng


# -- loading models for generate / eval / bench --------------------------------------------------
def resolve_model_dir(path) -> Path:
    """What a user names as a model, as a from_pretrained directory:
    ``smollm2`` -> the cached SmolLM2-135M-Instruct copy; checkpoint dir -> its verified model/;
    finished fine-tuning run -> RUN/model (the final, merged model); run dir -> latest good checkpoint's
    model/; Hugging Face model dir -> itself."""
    if str(path) == "smollm2":
        from ..assets import smollm2_model_dir

        return smollm2_model_dir()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if (p / MANIFEST).is_file() or p.name.startswith(PREFIX):
        return verify(p) / "model"
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "checkpoints").is_dir():
        ckpt = latest_good(p)
        if ckpt is None:
            raise CheckpointError(f"run {p} has no good checkpoint")
        return ckpt / "model"
    if (p / "config.json").is_file():
        return p
    raise RevLLMError(f"{p} is not a run directory, a checkpoint or a Hugging Face model directory (no config.json)")


def load_model(path, dtype=torch.float32):
    """AutoModelForCausalLM from a run/checkpoint/HF dir, offline, safetensors only, no remote code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import revllm  # noqa: F401  (registers RevLLMConfig with the Auto classes)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if str(path).endswith(".gguf"):  # transformers' gguf loader (dequantized weights)
        from ..convert.from_hf import load_source

        return load_source(path, dtype)
    d = resolve_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, local_files_only=True, use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot load model from {d}: {msg}") from None
    params = list(model.parameters())
    bad = nonfinite(params)
    if bad:  # its logits would be NaN: generation would print only the prompt, eval a loss of nan
        raise CheckpointError(f"model {d} has non-finite weights (NaN/inf in {bad} of {len(params)} tensors); "
                              "refusing it: use an earlier checkpoint")
    return model


def load_tokenizer(path, required: bool = True):
    """Tokenizer from a run/checkpoint/HF/tokenizer dir, a .gguf file, or ``smollm2`` for the embedded
    default; with ``required=False`` a model saved without one gives None."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if not required:
        try:
            return load_tokenizer(path)
        except RevLLMError:
            return None
    if str(path).endswith(".gguf"):
        p = Path(path)
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    if str(path) == "smollm2":
        from ..assets import smollm2_tokenizer_dir

        d = smollm2_tokenizer_dir()
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer {p} does not exist")
        d = p if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file() else resolve_model_dir(p)
    try:
        return AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise RevLLMError(f"cannot load a tokenizer from {d}: {str(e).splitlines()[0]}") from None
