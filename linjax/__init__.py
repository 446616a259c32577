"""linjax: linear attention and LLM linearization in JAX / Flax NNX.

Top-level names are imported lazily so `import linjax` stays cheap and `linjax.ops` never
pulls in Flax.
"""
__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": ("linjax.convert", "from_pretrained"),
    "save_pretrained": ("linjax.convert", "save_pretrained"),
    "linearize": ("linjax.linearize", "linearize"),
    "evaluate": ("linjax.eval", "evaluate"),
    "Llama": ("linjax.models.llama", "Llama"),
    "LlamaConfig": ("linjax.models.llama", "LlamaConfig"),
    "compress_ffn": ("linjax.compress", "compress_ffn"),
    "merge_ffn": ("linjax.compress", "merge_ffn"),
    "RecurrentTransformer": ("linjax.models.recurrent_transformer", "RecurrentTransformer"),
    "RecurrentTransformerConfig": ("linjax.models.recurrent_transformer",
                                   "RecurrentTransformerConfig"),
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    mod, attr = _LAZY[name]
    return getattr(importlib.import_module(mod), attr)
  raise AttributeError(f"module 'linjax' has no attribute {name!r}")
