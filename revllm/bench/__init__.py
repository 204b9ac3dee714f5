"""Benchmarks: memory vs depth, same-batch step time, and max batch / throughput under a memory budget.

Every table compares the same model in four kinds of configuration (``configs.py``):
(a) ``euler``: the standard residual net, all activations stored;
(b) ``euler_ckpt``: (a) with per-layer activation checkpointing (HF's non-reentrant gradient checkpointing);
(c) ``<dynamics>``: a reversible dynamics with memory-free backprop;
(d) ``<dynamics>_stored``: the same reversible model under ordinary stored autograd.
All use the model's chunked LM-head loss, so the logits never dominate.

Peak memory and capacity probes run in a fresh process each (``worker.py``), so one row's allocator
state and RSS high-water mark cannot leak into the next.
"""
