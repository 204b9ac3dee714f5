"""Residual-branch families, one file each, and the registry the rest of revllm reads.

Each module below provides ``HF`` (an ``HFSource``: a Hugging Face architecture it converts from) and,
if it defines blocks, ``SPEC`` (a ``FamilySpec``). Adding a family is its file plus its name here.
"""

from . import gemma, gpt2, llama, mistral, qwen2
from .spec import FamilySpec, HFSource

_MODULES = (gpt2, llama, qwen2, mistral, gemma)

FAMILIES: dict[str, FamilySpec] = {m.SPEC.name: m.SPEC for m in _MODULES if hasattr(m, "SPEC")}
HF_SOURCES: dict[str, HFSource] = {m.HF.model_type: m.HF for m in _MODULES}


def family_of(config) -> FamilySpec:
    """The spec of a RevLLMConfig (``block``) or of a supported HF config (``model_type``)."""
    block = getattr(config, "block", None)
    if block is None:
        source = HF_SOURCES.get(getattr(config, "model_type", None))
        if source is None:
            raise ValueError(
                f"model_type={getattr(config, 'model_type', None)!r} is not a supported family; "
                f"supported: {', '.join(HF_SOURCES)}"
            )
        block = source.family
    return FAMILIES[block]


__all__ = ["FAMILIES", "HF_SOURCES", "FamilySpec", "HFSource", "family_of"]
