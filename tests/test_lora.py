"""LoRA (peft) on RevLLMForCausalLM: memory-free gradients equal stored ones; adapters merge back."""

import copy

import pytest
import torch
from conftest import FAMILIES, tiny_model

from revllm.convert.finetune import add_lora


def _lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _randomize_lora_b(model):
    # peft initializes B = 0, so A's gradient is zero; randomize B so both adapter factors are tested.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


@pytest.mark.parametrize("block", FAMILIES)
@pytest.mark.parametrize("dynamics", ["midpoint", "hamiltonian"])
def test_lora_memory_free_grads_match_stored(block, dynamics):
    base = tiny_model(block=block, dynamics=dynamics, dtype=torch.float64)
    peft_mf = add_lora(base, r=4)
    _randomize_lora_b(peft_mf)
    peft_mf.train()
    ids = torch.randint(0, 97, (2, 12))
    stored = copy.deepcopy(peft_mf)
    stored.get_base_model().config.memory_free = False
    g_mf, g_st = _lora_grads(peft_mf, ids), _lora_grads(stored, ids)
    assert g_mf and all("lora_" in n for n in g_mf)  # only adapters train
    target = "c_attn" if block == "gpt2" else "q_proj"
    assert any(target in n for n in g_mf)
    for n in g_mf:
        torch.testing.assert_close(g_mf[n], g_st[n], rtol=1e-9, atol=1e-12, msg=n)
        assert g_mf[n].abs().sum() > 0, n


@pytest.mark.parametrize("block", FAMILIES)
def test_lora_step_then_merge_gives_same_logits(block):
    base = tiny_model(block=block, dynamics="midpoint", dtype=torch.float64)
    model = add_lora(base, r=4)
    ids = torch.randint(0, 97, (2, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        after = merged(input_ids=ids).logits
    assert type(merged).__name__ == "RevLLMForCausalLM"
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
