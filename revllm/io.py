"""Ground-floor I/O: atomic writes, the verified manifest, and loading models, tokenizers and sources.

Every other package imports these; this module imports only ``errors`` and ``assets`` (where files are) from
revllm. It also keeps the cached from_pretrained copies of the embedded SmolLM2 (``smollm2_model_dir``).

* **Atomic writes.** ``atomic_write`` (one file) and ``atomic_dir`` / ``replace_dir`` (a directory built
  under a temporary name, then ``os.replace``-d into place; an existing one is moved aside first and
  deleted only once the new one is in place). A crash or a full disk never leaves a half-written result.
* **One verified manifest.** ``manifest.json`` maps every other file of a directory (relative path) to its
  SHA-256 and is written last; ``verify`` refuses a directory whose manifest is missing, does not cover a
  file, or does not match (``CheckpointError``). Training checkpoints and sharded (DCP) checkpoints both
  use it.
* **Run layout.** ``RUN/checkpoints/step_XXXXXXXX/`` (``list_checkpoints``); ``latest_good`` is the newest
  one that verifies, each bad one skipped with one plain line on stderr.
* **Loading.** ``load_model(path)`` / ``load_tokenizer(path)`` accept a run dir (its latest good
  checkpoint), a checkpoint dir, a finished fine-tuning run, any HF model dir, a .gguf file or
  ``smollm2``; ``load_source`` loads a conversion source (HF dir or .gguf). All local files only
  (``local_files_only=True`` on every ``from_pretrained``: nothing here writes ``HF_HUB_OFFLINE`` or any
  other variable into the caller's environment), safetensors only, never remote code; nothing is
  unpickled. Weights that are not finite are refused.
* **Tokenizer identity** (``tokenizer_identity``): name, vocab size, separator id and the SHA-256 of its
  tokenizer.json, recorded by ``revllm data`` and checked by training and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from .assets import cache_dir, smollm2_gguf
from .errors import CheckpointError, RevLLMError, read_json

MANIFEST = "manifest.json"
PREFIX = "step_"


def say(msg: str) -> None:
    """One plain line on stderr that does not glue itself to a running progress bar."""
    tqdm.write(msg, file=sys.stderr)


# -- atomic writes -------------------------------------------------------------------------------
def atomic_write(path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a result file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_dir(tmp, final, old=None) -> Path:
    """Move the finished directory ``tmp`` to ``final`` (one filesystem). ``os.replace`` cannot replace a
    non-empty directory: an existing ``final`` is moved aside to ``old`` first and deleted only after the
    new one is in place, so at every moment one complete directory exists."""
    tmp, final = Path(tmp), Path(final)
    old = Path(old) if old is not None else final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by an interrupted earlier replace
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_dir(target, build, keep_existing: bool = False) -> Path:
    """Build a directory with ``build(tmpdir)`` and move it to ``target``. ``keep_existing``: a cache
    entry; an existing ``target`` is returned as it is (and a concurrent builder's wins the race)."""
    target = Path(target)
    if keep_existing and target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        if not keep_existing:
            replace_dir(tmp, target)
        else:
            try:
                os.replace(tmp, target)
            except OSError:  # another process won the race: keep theirs
                if not target.is_dir():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_model_atomic(model, out, tokenizer=None) -> Path:
    """``save_pretrained`` (with the tokenizer alongside) into ``out`` as one atomic directory: a crash never
    leaves a half-written model, and an existing ``out`` is replaced only once the new one is complete."""

    def build(tmp: Path):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_dir(out, build)


# -- the embedded SmolLM2, as from_pretrained directories ----------------------------------------
def smollm2_tokenizer_dir() -> Path:
    """A converted (tokenizer.json) copy of SmolLM2's tokenizer, cached after the first call."""

    def build(tmp: Path):
        gguf = smollm2_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True).save_pretrained(tmp)

    return atomic_dir(cache_dir() / "smollm2-135m-instruct-tokenizer", build, keep_existing=True)


def smollm2_model_dir() -> Path:
    """An fp32 safetensors copy of SmolLM2-135M-Instruct (LlamaForCausalLM), cached after the first call.

    The GGUF-loaded model refuses ``save_pretrained``; it is rebuilt as a plain LlamaForCausalLM from its
    config without the quantization entry, which gives bit-identical logits.
    """

    def build(tmp: Path):
        gguf = smollm2_gguf()
        src = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        clean = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
        clean.load_state_dict(src.state_dict())
        clean.generation_config = src.generation_config
        clean.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), local_files_only=True).save_pretrained(tmp)

    return atomic_dir(cache_dir() / "smollm2-135m-instruct", build, keep_existing=True)


# -- the verified manifest -----------------------------------------------------------------------
def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root) -> None:
    """``root/manifest.json``: the SHA-256 of every other file under ``root``. Write it last."""
    root = Path(root)
    atomic_write(
        root / MANIFEST,
        json.dumps({str(p.relative_to(root)): sha256_file(p) for p in _files(root)}, indent=1, sort_keys=True),
    )


def verify(ckpt) -> Path:
    """Raise CheckpointError unless every file listed in the manifest is present and intact."""
    ckpt = Path(ckpt)
    entries = read_json(
        ckpt / MANIFEST, f"checkpoint {ckpt} is incomplete (no {MANIFEST}); refusing it", CheckpointError
    )
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
        if sha256_file(p) != digest:
            raise CheckpointError(f"checkpoint {ckpt} is corrupted: {rel} does not match its sha256; refusing it")
    return ckpt


# -- run layout ----------------------------------------------------------------------------------
def list_checkpoints(run) -> list[Path]:
    d = Path(run) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(
        p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    )


def latest_good(run, action: str = "resuming from") -> Path | None:
    """Newest checkpoint that verifies; each bad one is skipped (never deleted) with one plain line,
    ``checkpoint step_N is corrupted (reason); <action> step_M``."""
    skipped = []
    good = None
    for ckpt in reversed(list_checkpoints(run)):
        try:
            good = verify(ckpt)
            break
        except CheckpointError as e:
            reason = (
                str(e).replace(f"checkpoint {ckpt} is ", "").removesuffix("; refusing it").removeprefix("corrupted: ")
            )
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


# -- loading models and tokenizers ---------------------------------------------------------------
def resolve_model_dir(path) -> Path:
    """What a user names as a model, as a from_pretrained directory:
    ``smollm2`` -> the cached SmolLM2-135M-Instruct copy; checkpoint dir -> its verified model/;
    finished fine-tuning run -> RUN/model (the final, merged model); run dir -> latest good checkpoint's
    model/; Hugging Face model dir -> itself."""
    if str(path) == "smollm2":
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
    """AutoModelForCausalLM from a run/checkpoint/HF dir, offline, safetensors only, no remote code.
    (revllm's own classes are registered with the Auto classes by ``import revllm``, which importing this
    module has already run.)"""
    hf_logging.disable_progress_bar()
    if str(path).endswith(".gguf"):  # transformers' gguf loader (dequantized weights)
        return load_source(path, dtype)
    d = resolve_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            d, dtype=dtype, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot load model from {d}: {msg}") from None
    params = list(model.parameters())
    bad = nonfinite(params)
    if bad:  # its logits would be NaN: generation would print only the prompt, eval a loss of nan
        raise CheckpointError(
            f"model {d} has non-finite weights (NaN/inf in {bad} of {len(params)} tensors); "
            "refusing it: use an earlier checkpoint"
        )
    return model


def load_tokenizer(path, required: bool = True):
    """Tokenizer from a run/checkpoint/HF/tokenizer dir, a .gguf file, or ``smollm2`` for the embedded
    default; with ``required=False`` a model saved without one gives None."""
    if not required:
        try:
            return load_tokenizer(path)
        except RevLLMError:
            return None
    if str(path).endswith(".gguf"):
        p = Path(path)
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)
    if str(path) == "smollm2":
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


def tokenizer_identity(tokenizer, source: str) -> dict:
    """What identifies a tokenizer: its name/source, vocab size, separator id and a content hash."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        tj = Path(d) / "tokenizer.json"
        digest = sha256_file(tj) if tj.is_file() else None
    sep = (
        tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if "<|endoftext|>" in tokenizer.get_vocab()
        else tokenizer.eos_token_id
    )
    if sep is None:
        raise RevLLMError(f"tokenizer {source} has no end-of-text/eos token to separate documents")
    name = "SmolLM2-135M-Instruct" if source == "smollm2" else getattr(tokenizer, "name_or_path", source)
    return {"name": name, "source": source, "sha256": digest, "vocab_size": len(tokenizer), "separator_id": int(sep)}


# -- conversion sources --------------------------------------------------------------------------
def load_source(src, dtype=torch.float32, supported: Mapping[str, str] | None = None):
    """Load an HF model from a directory or a .gguf file (offline, no remote code). ``supported``
    (model_type -> class name): refuse any other architecture before a weight is read."""
    path = Path(src)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
        )
        model.config.__dict__.pop("quantization_config", None)  # dequantized weights: a plain model now
        return model
    if not path.is_dir():
        raise FileNotFoundError(f"source {src} is neither a model directory nor a .gguf file")
    if not (path / "config.json").is_file():
        raise RevLLMError(f"{path} has no config.json: not a Hugging Face model directory")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    if supported is not None and cfg.model_type not in supported:
        names = ", ".join(f"{cls} ({mt})" for mt, cls in supported.items())
        raise RevLLMError(f"unsupported architecture {cfg.model_type!r}; supported: {names}")
    if not any(path.glob("*.safetensors")):  # pickled .bin / .pt weights are never loaded (they can run code)
        raise RevLLMError(
            f"{path} has no .safetensors weights; pickle checkpoints (.bin) are not loaded: "
            "re-save the model with save_pretrained (safetensors) where you trust it"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)


def load_source_tokenizer(src):
    """The tokenizer that belongs to ``src`` (dir or .gguf), or None when the directory has none."""
    path = Path(src)
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        warnings.warn(f"no tokenizer copied from {src}: {e}")
        return None
