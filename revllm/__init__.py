"""revllm: reversible large language models (arXiv 2512.02056) for memory-free training and fine-tuning.

``import revllm`` registers ``RevLLMConfig`` / ``RevLLMForCausalLM`` with transformers' Auto classes,
so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a saved revllm model.
"""

from transformers import AutoConfig, AutoModelForCausalLM

# The function, not the subpackage: importing it here binds ``revllm.convert`` to the function for good
# (the subpackage stays importable as ``revllm.convert`` via sys.modules / ``from revllm.convert import``).
from .convert import convert
from .dynamics import DYNAMICS
from .io import load_model, load_tokenizer
from .modeling import RevLLMConfig, RevLLMForCausalLM

AutoConfig.register("revllm", RevLLMConfig)
AutoModelForCausalLM.register(RevLLMConfig, RevLLMForCausalLM)

__version__ = "0.1.0"
__all__ = ["DYNAMICS", "convert", "load_model", "load_tokenizer", "RevLLMConfig", "RevLLMForCausalLM", "__version__"]
