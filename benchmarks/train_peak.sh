#!/usr/bin/env bash
# Whole-process peak of `revllm train` (steps + final evaluation + checkpoint) vs depth, memory-free and
# stored, with revllm's allocator setting and with glibc's default (issue 15). One fresh process per row;
# run it on a quiet machine. Usage: [JEMALLOC=/path/libjemalloc.so.2] bash benchmarks/train_peak.sh [DATA] [OUT]
#   DATA: a token dir (default: runs/kjv-smollm2, made from the KJV with SmolLM2's tokenizer if missing)
#   JEMALLOC: also run jemalloc, preloaded, with purging off (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-runs/kjv-smollm2}" OUT="${2:-runs/train_peak}" BIN="${REVLLM:-.venv/bin/revllm}"
[ -d "$DATA" ] || "$BIN" data .cache/assets/kjv.txt --out "$DATA" --no-progress
mkdir -p "$OUT"
printf "| run | layers | peak MB | steps' peak MB | wall s | user s | kernel s |\n|---|---:|---:|---:|---:|---:|---:|\n"
for L in 4 32; do
  for mode in memory-free no-memory-free; do
    for alloc in setting default ${JEMALLOC:+jemalloc}; do
      run="$OUT/L$L-$mode-$alloc"; rm -rf "$run"
      case $alloc in
        setting) envs=(REVLLM_ALLOCATOR_TUNING=1) ;;
        default) envs=(REVLLM_ALLOCATOR_TUNING=0) ;;
        jemalloc) envs=(LD_PRELOAD="$JEMALLOC" MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1) ;;
      esac
      /usr/bin/time -o "$run.time" -f "%e %U %S" env "${envs[@]}" OMP_NUM_THREADS=1 "$BIN" train \
        --data "$DATA" --out "$run" --block gpt2 --dynamics midpoint --$mode --layers $L --hidden 128 --heads 4 \
        --seq-len 512 --batch-size 16 --max-steps 4 --warmup 0 --eval-interval 1000 --eval-iters 1 \
        --checkpoint-interval 1000 --log-interval 1 --no-progress > "$run.log" 2>&1
      read -r wall user sys < "$run.time"
      python3 - "$run" "$mode, $alloc" "$L" "$wall" "$user" "$sys" <<'PY'
import csv, json, sys
run, name, L, wall, user, sys_s = sys.argv[1:]
peak = json.load(open(f"{run}/summary.json"))["peak_mb"]
steps = max(float(r["mem_mb"]) for r in csv.DictReader(open(f"{run}/metrics.csv")) if r.get("mem_mb"))
print(f"| {name} | {L} | {peak:,.0f} | {steps:,.0f} | {float(wall):.1f} | {float(user):.1f} | {float(sys_s):.1f} |")
PY
    done
  done
done
