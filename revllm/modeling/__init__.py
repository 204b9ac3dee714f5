from .configuration_revllm import RevLLMConfig
from .modeling_revllm import RevLLMForCausalLM, RevLLMPreTrainedModel

__all__ = ["RevLLMConfig", "RevLLMForCausalLM", "RevLLMPreTrainedModel"]
