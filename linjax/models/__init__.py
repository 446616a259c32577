"""Models: the Llama family with a per-layer token mixer."""
from linjax.models.llama import Llama, LlamaConfig, UnsupportedConfigError

__all__ = ["Llama", "LlamaConfig", "UnsupportedConfigError"]
