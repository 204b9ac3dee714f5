#!/usr/bin/env bash
# Mutation testing of the core modules (docs/mutation.md). Too slow for CI; run by hand:
#
#   bash scripts/mutation.sh bugs      # the issue-21 table's deliberate bugs, each on a scratch copy (~10 min)
#   bash scripts/mutation.sh mutmut    # mutmut over [tool.mutmut] in pyproject.toml (hours on 2 cores)
#   bash scripts/mutation.sh results   # mutmut's per-mutant status after a run
#   bash scripts/mutation.sh core [GLOB...]  # the method's modules only, fast runner, scratch copy (docs/mutation.md)
#   bash scripts/mutation.sh core-results    # its per-mutant status
#
# `bugs` copies the tree to a temporary directory per bug, applies one exact text replacement (the script
# stops if the text is not found, so a refactor cannot silently make a bug vacuous), runs the fast tests
# named for it and reports KILLED (some test failed) or SURVIVED. The working tree is never modified.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(pwd)/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1

case "${1:-bugs}" in
mutmut)
  rm -rf mutants
  # nice: shared machines; mutmut narrows the runner to the tests that reach each mutated function.
  nice -n 10 "$(dirname "$PY")/mutmut" run --max-children "${MUTMUT_CHILDREN:-2}"
  "$(dirname "$PY")/mutmut" results --all true || true
  ;;
results)
  "$(dirname "$PY")/mutmut" results --all true
  ;;
core|core-results)
  # The method's modules only (engine/function.py, modeling/loss.py, dynamics/ but fixedpoint.py), with the
  # fast test files that exercise them, in a scratch copy (MUTMUT_DIR) so the tree can change meanwhile.
  # Optional arguments: mutant-name globs, e.g. "revllm.engine.function.x__backward*" (mutmut resumes).
  DIR="${MUTMUT_DIR:-/tmp/revllm-mutmut-core}"
  if [ "$1" = core ]; then
    shift
    mkdir -p "$DIR"
    rm -rf "$DIR/revllm" "$DIR/tests"
    cp -r revllm tests "$DIR/"
    "$PY" - "$DIR/pyproject.toml" <<'PYEOF'
import re, sys
text = open("pyproject.toml").read()
core = """[tool.mutmut]
source_paths = ["revllm/"]
only_mutate = ["revllm/engine/function.py", "revllm/modeling/loss.py", "revllm/dynamics/base.py",
               "revllm/dynamics/euler.py", "revllm/dynamics/hamiltonian.py", "revllm/dynamics/leapfrog.py",
               "revllm/dynamics/midpoint.py"]
use_git_change_detection = false
pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow"]
pytest_add_cli_args_test_selection = [
  "tests/test_oracles.py", "tests/test_engine.py", "tests/test_exact.py", "tests/test_layer_terms.py",
  "tests/test_fixedpoint.py", "tests/test_dynamics_protocol.py", "tests/test_model.py", "tests/test_speed_paths.py",
  "tests/test_engine_edges.py", "-k", "not cli_ and not fsdp and not lora",
]

"""
text, n = re.subn(r"\[tool\.mutmut\].*?(?=\n# Lint and format)", core, text, flags=re.S)
assert n == 1, "[tool.mutmut] block not found in pyproject.toml"
open(sys.argv[1], "w").write(text)
PYEOF
    (cd "$DIR" && nice -n 15 "$(dirname "$PY")/mutmut" run --max-children "${MUTMUT_CHILDREN:-1}" "$@") || true
  fi
  (cd "$DIR" && "$(dirname "$PY")/mutmut" results --all true)
  ;;
bugs)
  shift || true
  exec nice -n 10 "$PY" - "$@" <<'EOF'
import os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path.cwd()
# (name, file, text, replacement, tests that must fail)
BUGS = [
    ("midpoint_a inverse r / a -> r * a", "revllm/dynamics/base.py",
     "return r if _is_one(a) else r / a", "return r if _is_one(a) else r * a",
     ["tests/test_engine.py", "tests/test_oracles.py"]),
    ("dropout replay skips set_rng_state", "revllm/engine/rng.py",
     "        torch.set_rng_state(cpu)\n", "        pass\n", ["tests/test_engine.py"]),
    ("dropout replay without fork_rng (caller's RNG stream changed)", "revllm/engine/rng.py",
     'with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):',
     "with contextlib.nullcontext():", ["tests/test_contracts.py::test_dropout_replay_leaves_the_callers_rng_stream_untouched"]),
    ("loss denominator counts ignored labels", "revllm/modeling/loss.py",
     "count = (y != -100).sum()", "count = y.numel()", ["tests/test_oracles.py"]),
    ("LM-head weight detached in the training loss", "revllm/modeling/loss.py",
     "checkpoint(_chunk_loss_sum, hs, lm_head.weight,", "checkpoint(_chunk_loss_sum, hs, lm_head.weight.detach(),",
     ["tests/test_oracles.py"]),
    ("labels shifted by one in the training branch", "revllm/modeling/loss.py",
     "y = labels[:, 1:].reshape(-1)", "y = (labels[:, :-1] if torch.is_grad_enabled() else labels[:, 1:]).reshape(-1)",
     ["tests/test_oracles.py::test_training_loss_is_mean_next_token_cross_entropy"]),
    ("manifest verification skips sha256", "revllm/io.py",
     "if sha256_file(p) != digest:", "if False:", ["tests/test_train.py"]),
    ("a file listed in the manifest is missing and the checkpoint is accepted", "revllm/io.py",
     'raise CheckpointError(f"checkpoint {ckpt} is incomplete: {rel} is missing; refusing it")', "continue",
     ["tests/test_contracts.py::test_checkpoint_with_a_listed_file_missing_is_refused"]),
    ("sharded, written before the manifest: a listed file missing is accepted", "revllm/parallel/checkpoint.py",
     "if not p.is_file() or {", "if p.is_file() and {",
     ["tests/test_io.py::test_sharded_checkpoint_from_before_the_manifest_still_verifies"]),
    ("leapfrog B coefficient 2 -> 1.5", "revllm/dynamics/leapfrog.py",
     "return -1.0, 2.0, self.h * self.h", "return -1.0, 1.5, self.h * self.h", ["tests/test_oracles.py"]),
    ("Hamiltonian half-steps swapped (MLP before attention)", "revllm/dynamics/hamiltonian.py",
     'parts = ("attn", "mlp")', 'parts = ("mlp", "attn")', ["tests/test_oracles.py"]),
    # README claims that had no test (issue 21, item 2)
    ("GGUF: weights loaded in bf16 whatever dtype was asked", "revllm/io.py",
     "gguf_file=path.name, dtype=dtype,", "gguf_file=path.name, dtype=torch.bfloat16,", ["tests/test_gguf.py"]),
    ("RoPE scaling accepted", "revllm/convert/from_hf.py",
     'if rope_type != "default":', "if False:", ["tests/test_contracts.py::test_conversion_refuses_unsupported_features"]),
    ("sliding window accepted", "revllm/convert/from_hf.py",
     'if getattr(c, "use_sliding_window", False):', "if False:",
     ["tests/test_contracts.py::test_conversion_refuses_unsupported_features"]),
    ("MLP bias accepted", "revllm/convert/from_hf.py",
     'if getattr(c, "mlp_bias", False):', "if False:", ["tests/test_contracts.py::test_conversion_refuses_unsupported_features"]),
    ("unexpected keys accepted", "revllm/convert/from_hf.py",
     "if missing or result.unexpected_keys:", "if missing:",
     ["tests/test_contracts.py::test_conversion_refuses_a_weight_it_cannot_place"]),
    ("FSDP2 accepts a LoRA model", "revllm/parallel/wrap.py",
     'if type(model).__name__.startswith("Peft"):', "if False:", ["tests/test_contracts.py::test_fsdp2_refuses_a_lora_model"]),
    ("recompute hooks not installed on a model sharded elsewhere", "revllm/parallel/wrap.py",
     "layer.register_forward_pre_hook(_fresh_recompute_hook, prepend=True, with_kwargs=True)", "pass",
     ["tests/test_contracts.py::test_recompute_hooks_on_a_model_sharded_elsewhere"]),
    ("DCP reload drops the optimizer state", "revllm/parallel/checkpoint.py",
     "    to_load = _state_dicts(model, optimizer)\n    try:", "    to_load = _state_dicts(model, None)\n    optimizer = None\n    try:",
     ["tests/test_distributed.py::test_two_process_dcp_checkpoint_reloads_in_one_process"]),
    ("CLI user errors exit 1", "revllm/cli.py", "EXIT_USAGE = 2", "EXIT_USAGE = 1",
     ["tests/test_contracts.py::test_cli_binary_input_is_one_line_exit_2"]),
    ("CLI error message keeps its newlines", "revllm/cli.py", 'msg = " ".join(str(e).split()) or type(e).__name__',
     'msg = str(e) + "\\n(details above)"', ["tests/test_contracts.py::test_cli_foreign_tokenizer_is_one_line_exit_2"]),
    ("inf loss not caught (only NaN)", "revllm/train/loop.py", "if not math.isfinite(train_loss):",
     "if math.isnan(train_loss):", ["tests/test_contracts.py::test_inf_loss_stops_training_and_names_the_last_good_checkpoint",
                                    "tests/test_contracts.py::test_cli_non_finite_loss_is_one_line_exit_2_and_keeps_the_checkpoint"]),
]
only = sys.argv[1:]
rows = []
for name, rel, old, new, tests in BUGS:
    if only and not any(o in name for o in only):
        continue
    with tempfile.TemporaryDirectory(prefix="revllm-bug-") as tmp:
        for part in ("revllm", "tests", "pyproject.toml"):
            src = ROOT / part
            (shutil.copytree if src.is_dir() else shutil.copy)(src, Path(tmp) / part)
        target = Path(tmp) / rel
        text = target.read_text()
        if text.count(old) != 1:
            sys.exit(f"bug {name!r}: the text to replace occurs {text.count(old)} times in {rel}; update scripts/mutation.sh")
        target.write_text(text.replace(old, new))
        for link in (".cache",):  # assets the tests may read
            if (ROOT / link).exists():
                os.symlink(ROOT / link, Path(tmp) / link)
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-m", "not slow", *tests],
                           cwd=tmp, env=dict(os.environ, PYTHONPATH=tmp), capture_output=True, text=True)
        failed = [l.split(" ")[1] for l in r.stdout.splitlines() if l.startswith("FAILED ")]
        status = "KILLED" if r.returncode == 1 and failed else ("SURVIVED" if r.returncode == 0 else f"ERROR rc={r.returncode}")
        rows.append((name, status, failed[:1], time.time() - t0))
        print(f"{status:9s} {name}  <- {failed[:1] or r.stdout.strip().splitlines()[-1:]}  ({time.time() - t0:.0f} s)", flush=True)
print("\n| deliberate bug | result | first failing test |\n|---|---|---|")
for name, status, failed, _ in rows:
    print(f"| {name} | {status} | {' '.join(f'`{f}`' for f in failed)} |")
sys.exit(0 if all(s == "KILLED" for _, s, _, _ in rows) else 1)
EOF
  ;;
*)
  echo "usage: $0 [bugs [NAME-SUBSTRING ...] | mutmut | results | core [MUTANT-GLOB ...] | core-results]" >&2
  exit 2
  ;;
esac
