"""Fixtures for the pipeline tests (data/train/CLI): a tiny corpus and a tiny byte-level BPE tokenizer
trained on it with `tokenizers`, so the tests never need the SmolLM2 or KJV assets."""

import random

import pytest

WORDS = (
    "the lord said unto moses and aaron speak unto the children of israel that they bring me an offering "
    "in the beginning god created the heaven and the earth and the earth was without form and void"
).split()


def make_text(seed: int, n_lines: int) -> str:
    rng = random.Random(seed)
    return "".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".\n" for _ in range(n_lines)
    )


def train_tokenizer(path, vocab_size=300, seed=0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(make_text(seed, 400).splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tiny_bpe")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(make_text(1, 300))
    (d / "sub").mkdir()
    (d / "sub" / "b.md").write_text(make_text(2, 200))
    return d


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory, tiny_tokenizer, corpus_dir):
    from revllm.data import prepare_tokens

    out = tmp_path_factory.mktemp("tokens") / "tok"
    prepare_tokens([corpus_dir], out, tokenizer=str(tiny_tokenizer), val_fraction=0.1, progress=False)
    return out


def tiny_train_config(token_dir, out, **kw):
    from revllm.train import TrainConfig

    base = dict(
        data=str(token_dir),
        out=str(out),
        layers=2,
        hidden=32,
        heads=4,
        kv_heads=2,
        seq_len=32,
        batch_size=4,
        max_steps=6,
        warmup=2,
        lr=3e-3,
        eval_interval=3,
        eval_iters=2,
        checkpoint_interval=3,
        keep_last=0,
        log_interval=1,
        progress=False,
        loss_chunk_size=32,
    )
    base.update(kw)
    return TrainConfig(**base)


# A tiny hamiltonian run for the multi-process tests (`revllm train` flags; add --data, --out, --parallel).
DIST = (
    "--layers 2 --hidden 32 --heads 4 --kv-heads 2 --seq-len 32 --max-steps 4 --warmup 2 --lr 3e-3 --eval-interval 2 "
    "--eval-iters 2 --checkpoint-interval 2 --keep-last 0 --log-interval 1 --no-progress --loss-chunk-size 32 "
    "--dynamics hamiltonian --batch-size 2"
).split()
