"""revllm.io, the ground floor: one atomic write, one verified manifest (unchanged on disk for training
checkpoints, still accepting sharded checkpoints from before it), and atomic directories."""

import hashlib
import json

import pytest
from conftest import tiny_model

from revllm import io as rio
from revllm.errors import CheckpointError
from revllm.parallel import load_sharded, save_sharded


def test_manifest_on_disk_is_the_format_existing_checkpoints_have(tmp_path):
    """The training checkpoints' manifest did not change: {relative path: sha256 hex}, indent 1, sorted keys,
    every file but itself. A checkpoint written before the move verifies byte for byte the same way."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "trainer_state.json").write_text('{"step": 1}')
    rio.write_manifest(tmp_path)
    expected = {
        p: hashlib.sha256((tmp_path / p).read_bytes()).hexdigest() for p in ("model/config.json", "trainer_state.json")
    }
    assert (tmp_path / "manifest.json").read_text() == json.dumps(expected, indent=1, sort_keys=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model", "trainer_state.json"]  # no temp
    assert rio.verify(tmp_path) == tmp_path
    (tmp_path / "trainer_state.json").write_text('{"step": 2}')
    with pytest.raises(CheckpointError, match="trainer_state.json does not match its sha256"):
        rio.verify(tmp_path)


def test_sharded_checkpoint_uses_the_one_manifest(tmp_path):
    save_sharded(tmp_path / "ck", tiny_model(), state={"step": 1})
    assert rio.verify(tmp_path / "ck")  # the same verifier as training checkpoints
    assert "files" not in json.loads((tmp_path / "ck" / "trainer_state.json").read_text())


def _to_old_format(ck):
    """What save_sharded wrote before the manifest: no manifest.json; trainer_state.json lists each other
    file's size and SHA-256 under "files"."""
    (ck / "manifest.json").unlink()
    meta = json.loads((ck / "trainer_state.json").read_text())
    meta["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(ck.iterdir())
        if p.name != "trainer_state.json"
    }
    (ck / "trainer_state.json").write_text(json.dumps(meta, indent=1))


def test_sharded_checkpoint_from_before_the_manifest_still_verifies(tmp_path):
    model = tiny_model()
    save_sharded(tmp_path / "ck", model, state={"step": 7})
    _to_old_format(tmp_path / "ck")
    other = tiny_model(seed=3)
    assert load_sharded(tmp_path / "ck", other) == {"step": 7}
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    shard = next((tmp_path / "ck").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="missing or corrupted"):
        load_sharded(tmp_path / "ck", other)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing or corrupted"):
        load_sharded(tmp_path / "ck", other)


def test_atomic_dir_replaces_only_a_complete_directory(tmp_path):
    target = tmp_path / "out"

    def build(content):
        return lambda tmp: (tmp / "f").write_text(content)

    rio.atomic_dir(target, build("one"))
    with pytest.raises(OSError, match="disk full"):
        rio.atomic_dir(
            target, lambda tmp: ((tmp / "f").write_text("half"), (_ for _ in ()).throw(OSError("disk full")))
        )
    assert (target / "f").read_text() == "one"  # the failed build left the old directory as it was
    rio.atomic_dir(target, build("two"))
    assert (target / "f").read_text() == "two"
    assert rio.atomic_dir(target, build("three"), keep_existing=True) == target  # a cache entry is kept
    assert (target / "f").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or moved-aside directory left


def test_loading_leaves_the_callers_environment_unchanged(tmp_path, monkeypatch):
    """Library loaders run offline through explicit local_files_only arguments: loading a model, a tokenizer
    or a conversion source, or building a benchmark model, writes nothing into os.environ (it used to set
    HF_HUB_OFFLINE, turning the caller's whole process offline)."""
    import os

    import huggingface_hub.constants as hub
    from pipeline_fixtures import train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from revllm.bench.configs import Spec, build_model

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    tiny_model().save_pretrained(tmp_path / "rev")
    train_tokenizer(tmp_path / "rev")
    hf = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(hf).save_pretrained(tmp_path / "hf")
    before, hub_before = dict(os.environ), hub.HF_HUB_OFFLINE
    assert rio.load_model(tmp_path / "rev").config.model_type == "revllm"
    assert rio.load_tokenizer(tmp_path / "rev").eos_token == "<|endoftext|>"
    assert rio.load_source(tmp_path / "hf", supported={"llama": "LlamaForCausalLM"}).config.model_type == "llama"
    build_model(Spec(layers=1, d=32, heads=4, seq=16, batch=2, vocab=64, loss_chunk=8))
    assert dict(os.environ) == before
    assert hub.HF_HUB_OFFLINE == hub_before


def test_no_library_module_writes_the_environment():
    """Only the program (revllm/cli.py, and commands/common.offline that it calls) sets environment variables
    for its own process; every other module leaves os.environ alone (read with ast, nothing imported)."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "revllm"
    allowed = {"cli.py", "commands/common.py"}
    writes = []
    for path in sorted(src.rglob("*.py")):
        rel = str(path.relative_to(src))
        for node in ast.walk(ast.parse(path.read_text())):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                if ast.unparse(f.value) == "os.environ" and f.attr in ("setdefault", "update", "pop", "clear"):
                    target = ast.unparse(node)
                if ast.unparse(f) in ("os.putenv", "os.unsetenv"):
                    target = ast.unparse(node)
            if isinstance(node, (ast.Assign, ast.Delete)):
                for t in getattr(node, "targets", []):
                    if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ":
                        target = ast.unparse(node)
            if target and rel not in allowed:
                writes.append(f"{rel}:{node.lineno}: {target}")
    assert writes == []
