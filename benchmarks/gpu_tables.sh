#!/usr/bin/env bash
# The GPU tables, exactly as committed under benchmarks/results/*_<gpu>.{json,md,png}.
# One GPU, bf16 autocast (streams and weights fp32), budget = the card. Run from the repository root:
#   bash benchmarks/gpu_tables.sh            (about 20-30 min on an H100)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ALL=euler,euler_ckpt,midpoint,leapfrog,midpoint_a,hamiltonian,midpoint_stored

# Table 1: memory vs depth, d=512, 8 heads, seq 256, batch 8, vocab 8192; a fresh process per row.
$PY -m revllm.cli bench memory --device cuda --dtype bf16 --configs $ALL \
    --depths 6,12,24,48,96 --d 512 --heads 8 --seq 256 --batch 8 --vocab 8192 --max-seconds 600

# Table 2: step time at the same batch, ratio to (a); interleaved, median of 10 steps.
$PY -m revllm.cli bench speed --device cuda --dtype bf16 --configs $ALL \
    --layers 32 --d 512 --heads 8 --seq 1024 --batch 32 --vocab 8192 --repeats 10 --warmup 2

# Table 3: max batch on the card (doubling then bisection, fresh process per probe), tokens/s there.
# Paper Table 4 setup: d=512, 8 heads, 16/32/64/96 layers. About 120 probes of ~10-15 s each; an
# interrupted run keeps its finished rows (saved per row) and continues with --resume <its json>.
$PY -m revllm.cli bench capacity --device cuda --dtype bf16 --configs euler,euler_ckpt,midpoint \
    --depths 16,32,64,96 --d 512 --heads 8 --seq 1024 --vocab 8192 --start-batch 8 --tolerance 0.1 --steps 5 --warmup 2

# Memory-free tokens/s vs batch at 32 layers (the earlier session saw it fall with batch).
$PY -m revllm.cli bench speed --device cuda --dtype bf16 --configs midpoint \
    --layers 32 --d 512 --heads 8 --seq 1024 --batch 16,64,128,256,512,1024 --vocab 8192 --repeats 5 --warmup 1 --profile \
    --name speed-sweep

$PY -m revllm.cli bench report
