"""KV-cache generation: ``model.generate()`` equals a greedy loop without a cache, for every dynamics."""

import pytest
import torch
from conftest import ALL_DYNAMICS, FAMILIES, tiny_model


def _greedy_no_cache(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("block", FAMILIES)
@pytest.mark.parametrize("dynamics", ALL_DYNAMICS)
@pytest.mark.parametrize("initial_state", ["copy", "fixed_point"])
def test_generate_with_cache_equals_greedy_loop(block, dynamics, initial_state):
    model = tiny_model(block=block, dynamics=dynamics, initial_state=initial_state, dtype=torch.float64).eval()
    ids = torch.randint(0, 97, (2, 5))
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    hook.remove()
    assert seen[0] == 5 and set(seen[1:]) == {1}  # the cache was used: one new token per step
    assert torch.equal(out, _greedy_no_cache(model, ids, 10))


@pytest.mark.parametrize("block", FAMILIES)
def test_cached_step_logits_match_full_forward(block):
    from transformers import DynamicCache

    model = tiny_model(block=block, dynamics="hamiltonian", initial_state="fixed_point", dtype=torch.float64).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :6], cache=cache, use_cache=True)
        # no attention_mask given: the mask for 3 queries over 9 keys must be built bottom-right aligned
        rest = model(
            ids[:, 6:], cache=first.cache if hasattr(first, "cache") else first.past_key_values, use_cache=True
        )
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=1e-10, atol=1e-10)
    assert len(cache.layers) == model.config.num_hidden_layers + 1  # fixed_point's f_0 has its own slot


def test_converted_model_generates_like_original():
    from hf_tiny import tiny_hf

    from revllm.convert import convert

    src = tiny_hf("qwen2")
    rev = convert(src, dynamics="euler", dtype=torch.float64)
    ids = torch.randint(0, 97, (1, 6))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(rev.generate(ids, **kw), src.generate(ids, **kw))


@pytest.mark.parametrize("block", FAMILIES)
def test_exact_model_cached_forward_is_bitwise_the_uncached_one(block):
    # exact_reversal holds int64 fixed-point streams; the cached (generation) path must use them too,
    # or its logits drift from the uncached forward's by float rounding.
    # A cached forward over the whole input (same shapes as the uncached one) is bitwise equal; then 4 tokens are decoded one at a
    # time against the filled cache. One-query attention rounds differently from the full matrix, so decoding
    # is compared at fp32 rounding level (observed ~1e-7), far below what a wrong cache entry would change.
    from transformers import DynamicCache

    model = tiny_model(block=block, dynamics="midpoint_a", midpoint_a=1 / 16, exact_reversal=True).eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        assert torch.equal(model(ids, use_cache=True).logits, plain)
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :3], cache=cache, use_cache=True).logits]
        for t in range(3, 7):
            assert cache.get_seq_length() == t  # the cache really holds every earlier token
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    decoded = torch.cat(steps, 1)
    assert (decoded - plain).abs().max() <= 1e-5 * plain.abs().max(), (decoded - plain).abs().max()


@pytest.mark.parametrize("initial_state", ["copy", "fixed_point"])
def test_static_cache_is_refused_with_a_clear_error(initial_state):
    """A StaticCache pads keys to its full length, which the blocks' masks do not cover: refused in one
    line for every initial state (not a shape error deep in attention)."""
    model = tiny_model(block="llama", dynamics="midpoint", initial_state=initial_state).eval()
    with pytest.raises(ValueError, match="needs a DynamicCache"):
        model.generate(
            torch.randint(3, 97, (2, 6)),
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
        )
