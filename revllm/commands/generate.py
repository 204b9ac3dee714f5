"""``revllm generate``: sample text from a run, checkpoint or HF model dir (HF ``generate``)."""

from __future__ import annotations

import sys

import torch
from transformers import GenerationConfig

from ..errors import RevLLMError
from ..io import load_model, load_tokenizer
from .common import positive_int


def add_parser(sub):
    p = sub.add_parser("generate", help="sample text from a checkpoint (greedy, temperature, top-k, top-p)")
    p.add_argument("model", metavar="CKPT", help="run dir (latest good checkpoint), checkpoint dir or HF model dir")
    p.add_argument("--prompt", help="prompt text (default: read stdin)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one saved with the model)")
    p.set_defaults(func=run)


def run(args):
    if not args.greedy and (args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0):
        raise RevLLMError("need --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0 (or use --greedy)")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise RevLLMError("empty prompt: pass --prompt or pipe text on stdin")
    tok = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model).eval()
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    if enc["input_ids"].shape[1] == 0:
        raise RevLLMError("the prompt has no tokens (only whitespace?)")
    # eos may be one id or a list (the generation config's first, then the model config's, then the tokenizer's)
    eos = next(
        (
            e
            for e in (
                getattr(model.generation_config, "eos_token_id", None),
                model.config.eos_token_id,
                tok.eos_token_id,
            )
            if e is not None
        ),
        None,
    )
    pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=None if args.greedy else args.temperature,
        top_k=None if args.greedy else args.top_k,  # 0 = off (None would mean 50)
        top_p=None if args.greedy else args.top_p,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(args.seed)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and enc["input_ids"].shape[1] + args.max_new_tokens > max_pos:
        raise RevLLMError(
            f"prompt ({enc['input_ids'].shape[1]} tokens) + --max-new-tokens {args.max_new_tokens} "
            f"exceeds the model's {max_pos} positions"
        )
    with torch.no_grad():
        out = model.generate(**enc, generation_config=gen)
    print(prompt + _continuation(tok, enc["input_ids"][0].tolist(), out[0].tolist()))


def _continuation(tok, prompt_ids: list[int], out_ids: list[int]) -> str:
    """The text after the prompt. Decoded alone, the new ids lose their leading space with SentencePiece-style
    (Metaspace) tokenizers and words run together: cut the prompt's decoding off the whole sequence's."""
    full = tok.decode(out_ids, skip_special_tokens=True)
    head = tok.decode(prompt_ids, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head) :]
    return tok.decode(out_ids[len(prompt_ids) :], skip_special_tokens=True)
