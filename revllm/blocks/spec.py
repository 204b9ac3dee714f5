"""What the rest of revllm knows about a block family: one ``FamilySpec`` per family, one ``HFSource``
per Hugging Face architecture it converts from. Each lives next to its block file; ``blocks/__init__.py``
registers them. Configuration, modeling, conversion and fine-tuning read these and never switch on a
family's name, so a new family is its own file (blocks, spec, source) plus one registry line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FamilySpec:
    """A residual-branch family, the value of ``RevLLMConfig.block``."""

    name: str
    backbone: type[nn.Module]  # built as backbone(config); provides embed/layers/final_norm (see modeling)
    block: type[nn.Module]  # one layer's branch: never split across devices (``_no_split_modules``)
    embedding: str  # attribute of the backbone holding the token embedding (the tied LM head's weight)
    norms: tuple[type[nn.Module], ...]  # normalization modules, initialized to ``norm_weight``
    activations: tuple[str, ...]  # hidden_act values the blocks implement; the first is the default
    lora_targets: tuple[str, ...]  # module names peft's LoRA wraps (the attention projections)
    norm_weight: float = 1.0  # init of the norms' weight (0 where the norm applies 1 + w)
    lora_fan_in_fan_out: bool = False  # True for Conv1D layers, which store (in, out)
    grouped_kv: bool = True  # num_key_value_heads may be smaller than num_attention_heads
    free_head_dim: bool = True  # head_dim may differ from hidden_size / num_attention_heads

    def check(self, config) -> None:
        """Raise ``ValueError`` for a RevLLMConfig this family's blocks cannot build faithfully."""
        if config.hidden_act not in self.activations:
            raise ValueError(
                f"hidden_act={config.hidden_act!r} is not implemented for block={self.name!r}; "
                f"allowed: {', '.join(self.activations)}"
            )
        if not self.grouped_kv and config.num_key_value_heads != config.num_attention_heads:
            raise ValueError(f"num_key_value_heads must equal num_attention_heads for block={self.name!r}")
        if not self.free_head_dim and config.head_dim != config.hidden_size // config.num_attention_heads:
            raise ValueError(
                f"head_dim={config.head_dim} must be hidden_size / num_attention_heads for block={self.name!r}"
            )


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face causal-LM architecture converted into one family (``family``).

    ``translate(hf_config)`` returns the RevLLMConfig architecture fields and raises ``RevLLMError``
    (one line, naming the option) for anything the family's blocks do not compute. Weights are copied
    key for key after replacing the backbone prefix ``prefix`` by ``model.``; keys ending in one of
    ``skip`` are buffers, not weights."""

    model_type: str
    hf_class: str
    family: str
    prefix: str
    translate: Callable[..., dict]
    skip: tuple[str, ...] = ()

    def map_key(self, key: str) -> str:
        return "model." + key[len(self.prefix) :] if key.startswith(self.prefix) else key
