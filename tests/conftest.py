"""Tiny configs shared by the tests. Everything runs on CPU."""

import pytest
import torch

import revllm

REVERSIBLE = ["midpoint", "leapfrog", "midpoint_a", "hamiltonian"]
ALL_DYNAMICS = ["euler"] + REVERSIBLE
FAMILIES = ["gpt2", "llama"]


def tiny_config(block="llama", dynamics="midpoint", layers=2, **kw):
    base = dict(
        block=block,
        dynamics=dynamics,
        num_hidden_layers=layers,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2 if block == "llama" else 4,
        intermediate_size=64,
        vocab_size=97,
        max_position_embeddings=64,
        loss_chunk_size=16,
    )
    base.update(kw)
    return revllm.RevLLMConfig(**base)


def tiny_model(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return revllm.RevLLMForCausalLM(tiny_config(**kw)).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
