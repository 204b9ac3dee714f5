"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards.

Layout of a checkpoint directory::

    .metadata            DCP's index of every tensor shard (see "unpickling" below)
    __<rank>_0.distcp    each rank's tensor data (model, optimizer)
    trainer_state.json   the caller's JSON state (step, data position, ...) and the world size
    manifest.json        SHA-256 of every other file (``revllm.io.write_manifest``) -- written LAST

Works for DDP (full tensors, written once by DCP's de-duplication), FSDP2 (DTensor shards) and single
process, and reloads under a different world size (DCP reshards on load).

Safety, by the project's rules:
* **Atomic.** All ranks write into ``<dir>.tmp``; rank 0 writes the JSON and the manifest last and then
  moves the directory into place (``revllm.io.replace_dir``), so a crash leaves the previous checkpoint intact.
* **Corruption is refused.** The manifest is the single-process checkpoints' one (``revllm.io.verify``):
  rank 0 checks it before anything is loaded and every rank raises ``CheckpointError`` on a mismatch.
  Checkpoints written before the manifest (their ``trainer_state.json`` lists each file's size and
  SHA-256 under ``"files"``) are still verified, by that list.
* **No arbitrary unpickling.** DCP's ``FileSystemReader.read_metadata`` calls ``pickle.load`` on
  ``.metadata``. ``SafeFileSystemReader`` replaces it with an unpickler that resolves only DCP's own
  metadata dataclasses, ``torch.Size``, dtypes/layouts/memory formats, ``pathlib`` paths and plain
  containers; anything else (``os.system``, arbitrary classes) raises. Non-tensor values (optimizer hyper-parameters) are loaded with
  ``torch.load(weights_only=True)`` instead of DCP's default ``weights_only=False``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.api import CheckpointException as DCPException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..errors import CheckpointError
from ..io import MANIFEST, replace_dir, sha256_file, verify, write_manifest

STATE_FILE = "trainer_state.json"


# -- safe reading -------------------------------------------------------------------------------
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
        "StorageMeta",
        "MetadataIndex",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # looks a layout up by name in torch's namespace
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # storage_meta.checkpoint_id
    "collections": {"OrderedDict"},
}
_TORCH_SINGLETONS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_SINGLETONS):
            return getattr(torch, name)  # e.g. torch.float32, torch.strided
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from checkpoint metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP reader whose metadata unpickler only accepts DCP's metadata classes (see module docstring)."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Loads DCP's non-tensor entries with ``weights_only=True`` (DCP's default uses False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# -- save / load --------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_sharded(path, model, optimizer=None, state: dict | None = None) -> Path:
    """Write model (+ optimizer) shards and the JSON ``state`` to directory ``path``; collective.

    ``model`` may be the DDP wrapper, an FSDP2-sharded model or a plain model.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    to_save = _state_dicts(model, optimizer)
    dcp.save(to_save, storage_writer=dcp.FileSystemWriter(str(tmp)))
    _barrier()
    if _rank() == 0:
        meta = {"state": state or {}, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        write_manifest(tmp)
        replace_dir(tmp, path, old=path.with_name(path.name + ".old"))
    _barrier()
    return path


# Frozen parameters (LoRA bases) are part of the checkpoint too.
_OPTS = StateDictOptions(ignore_frozen_params=False)


def _state_dicts(model, optimizer) -> dict:
    """DCP state dicts (sharded where the model is): what is saved, and the templates loaded into."""
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=_OPTS)}
    msd, osd = get_state_dict(model, optimizer, options=_OPTS)
    return {"model": msd, "optim": osd}


def _verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong."""
    if not (path / MANIFEST).is_file():
        if (path / STATE_FILE).is_file():
            return _verify_listed(path)  # written before the manifest
        return f"{path} is not a complete sharded checkpoint (no {MANIFEST})"
    try:
        verify(path)
    except CheckpointError as e:
        return str(e)
    if not (path / ".metadata").is_file():
        return f"{path} has no DCP .metadata"
    return None


def _verify_listed(path: Path) -> str | None:
    """Checkpoints written before the manifest: ``trainer_state.json`` lists ``{"bytes", "sha256"}`` per file."""
    try:
        files = json.loads((path / STATE_FILE).read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{path / STATE_FILE} is unreadable ({e})"
    if ".metadata" not in files:
        return f"{path} has no DCP .metadata"
    for name, want in files.items():
        p = path / name
        if not p.is_file() or {"bytes": p.stat().st_size, "sha256": sha256_file(p)} != want:
            return f"{path / name} is missing or corrupted (size/SHA-256 differ from {STATE_FILE})"
    return None


def load_sharded(path, model, optimizer=None) -> dict:
    """Load a ``save_sharded`` checkpoint into ``model`` (+ ``optimizer``) in place; collective.

    Returns the JSON ``state`` saved with it. Raises ``CheckpointError`` if it is incomplete or corrupted.
    """
    path = Path(path)
    problem = [_verify(path) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)  # rank 0's own JSON-derived string, not file data
    if problem[0]:
        raise CheckpointError(problem[0])
    to_load = _state_dicts(model, optimizer)
    try:
        dcp.load(to_load, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except (pickle.UnpicklingError, RuntimeError, ValueError, DCPException) as e:
        # DCP wraps each rank's error in a CheckpointException (a BaseException): report the first cause.
        cause = next(iter(e.failures.values()))[0] if isinstance(e, DCPException) and e.failures else e
        raise CheckpointError(f"cannot load sharded checkpoint {path}: {str(cause).splitlines()[0]}") from e
    if optimizer is not None:
        set_state_dict(
            model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"], options=_OPTS
        )
    else:
        set_model_state_dict(model, to_load["model"], options=_OPTS)
    return json.loads((path / STATE_FILE).read_text())["state"]
