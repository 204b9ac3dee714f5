"""The run configuration: dataclass defaults <- YAML file <- command-line flags (unknown keys rejected).

YAML keys are the flag names (``seq_len`` or ``seq-len``). The resolved config is stored in every
checkpoint's trainer_state.json and in RUN/config.yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import RevLLMError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Keys a --resume may change; everything else comes from the checkpoint (it defines the run).
RESUME_MUTABLE = {
    "parallel",
    "max_steps",
    "eval_interval",
    "eval_iters",
    "checkpoint_interval",
    "keep_last",
    "log_interval",
    "resume",
    "out",
    "data",
    "progress",
    "max_time",
    "stop_after",
}


@dataclass
class TrainConfig:
    data: str | None = None  # token directory from `revllm data`
    out: str | None = None  # run directory
    # model (ignored with init_from, which brings its own config)
    block: str = "llama"
    dynamics: str = "midpoint"
    step_size: float | None = None
    initial_state: str = "copy"
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int | None = None
    max_positions: int | None = None  # default: seq_len
    dropout: float = 0.0
    memory_free: bool | None = None  # default: on for reversible dynamics
    exact_reversal: bool = False  # int64 fixed-point streams: bit-exact reconstruction (reversible rules only)
    activation_checkpointing: bool = False  # stored path only (the standard baseline)
    loss_chunk_size: int = 1024
    init_from: str | None = None
    # optimisation
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 20
    max_steps: int = 200
    schedule_steps: int | None = None  # steps the warmup + cosine plans (default max_steps); a resume keeps it
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    precision: str = "auto"
    parallel: str = "ddp"  # several processes (torchrun / accelerate launch): ddp | fsdp2
    seed: int = 0
    # bookkeeping
    eval_interval: int = 50
    eval_iters: int = 8
    checkpoint_interval: int = 100
    keep_last: int = 2
    log_interval: int = 10
    max_time: float | None = None  # seconds; stop (and checkpoint) early when exceeded
    stop_after: int | None = None  # stop (and checkpoint) after this step; the schedule still plans max_steps
    resume: bool = False
    progress: bool = True

    def validate(self) -> TrainConfig:
        if not self.data and not self.resume:  # --resume takes it from the checkpoint
            raise RevLLMError("--data is required (a token directory from `revllm data`)")
        if not self.out:
            raise RevLLMError("--out is required (the run directory)")
        if self.parallel not in ("ddp", "fsdp2"):
            raise RevLLMError(f"parallel={self.parallel!r} is unknown; allowed: ddp, fsdp2")
        if self.precision not in PRECISIONS:
            raise RevLLMError(f"precision={self.precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
        positive = (
            "layers",
            "hidden",
            "heads",
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_interval",
            "eval_iters",
            "checkpoint_interval",
            "log_interval",
            "loss_chunk_size",
        )
        for k in positive:
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RevLLMError(f"{k}={v!r} must be a positive integer")
        if self.seq_len < 2:  # a window of one token has nothing to predict (its loss is 0/0)
            raise RevLLMError(f"seq_len={self.seq_len} must be >= 2: one token to predict from, one to predict")
        for k in ("warmup", "keep_last", "seed"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 0:
                raise RevLLMError(f"{k}={getattr(self, k)!r} must be an integer >= 0")
        for f in dataclasses.fields(self):  # real-valued fields (YAML may hold a string such as '3e-3')
            v = getattr(self, f.name)
            if "float" in str(f.type) and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RevLLMError(f"{f.name}={v!r} must be a number")
        if self.schedule_steps is not None and (not isinstance(self.schedule_steps, int) or self.schedule_steps < 1):
            raise RevLLMError(f"schedule_steps={self.schedule_steps!r} must be a positive integer")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 1):
            raise RevLLMError(f"stop_after={self.stop_after!r} must be a step >= 1")
        if self.max_time is not None and not self.max_time > 0:
            raise RevLLMError(f"max_time={self.max_time!r} must be > 0 seconds")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise RevLLMError(f"need lr > 0 and 0 <= min_lr <= lr (got lr={self.lr}, min_lr={self.min_lr})")
        if self.weight_decay < 0 or self.clip < 0:
            raise RevLLMError("weight_decay and clip must be >= 0")
        if self.max_positions is not None and self.seq_len > self.max_positions:
            raise RevLLMError(f"seq_len={self.seq_len} exceeds max_positions={self.max_positions}")
        return self

    def model_kwargs(self, vocab_size: int, separator_id: int | None = None) -> dict:
        return dict(
            block=self.block,
            dynamics=self.dynamics,
            step_size=self.step_size,
            initial_state=self.initial_state,
            num_hidden_layers=self.layers,
            hidden_size=self.hidden,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=self.max_positions or self.seq_len,
            dropout=self.dropout,
            memory_free=self.memory_free,
            exact_reversal=self.exact_reversal,
            loss_chunk_size=self.loss_chunk_size,
            vocab_size=vocab_size,
            eos_token_id=separator_id,
            bos_token_id=separator_id,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _normalize(d: dict, where: str) -> dict:
    out = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key not in FIELDS:
            raise RevLLMError(f"unknown key {k!r} in {where}; allowed: {', '.join(sorted(FIELDS))}")
        out[key] = v
    return out


def _coerce_numbers(d: dict) -> dict:
    """PyYAML reads ``3e-3`` (no dot) as a string: turn such strings into numbers for real-valued fields."""
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    for k, v in d.items():
        if isinstance(v, str) and "float" in types.get(k, ""):
            try:
                d[k] = float(v)
            except ValueError:
                raise RevLLMError(f"{k}={v!r} must be a number") from None
    return d


# Keys that define the model; a model brought by init_from has its own, so these may not be given with it.
ARCH_KEYS = {
    "block",
    "dynamics",
    "exact_reversal",
    "step_size",
    "initial_state",
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "intermediate",
    "max_positions",
}


def load_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RevLLMError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise RevLLMError(f"config file {p} must be a mapping of flag names to values")
    return _coerce_numbers(_normalize(d, str(p)))


def build_config(yaml_path=None, overrides: dict | None = None, base: dict | None = None) -> TrainConfig:
    """defaults <- base (a stored config) <- YAML <- overrides (explicit flags; None values ignored)."""
    merged = {}
    if base:
        merged.update({k: v for k, v in base.items() if k in FIELDS})
    if yaml_path:
        merged.update(load_yaml(yaml_path))
    merged.update(_normalize({k: v for k, v in (overrides or {}).items() if v is not None}, "flags"))
    try:
        return TrainConfig(**merged)
    except TypeError as e:
        raise RevLLMError(str(e)) from None
