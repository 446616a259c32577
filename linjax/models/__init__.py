"""Models: the Llama family with a per-layer token mixer, and the recurrent transformer."""
from linjax.models.llama import Llama, LlamaConfig, UnsupportedConfigError

# linjax checkpoints (config.json "model_type") of models that are not a Llama:
# model_type -> (module, class); the class has `config_class` with `from_hf` / `to_hf`.
NATIVE_MODELS = {
    "linjax_recurrent_transformer": ("linjax.models.recurrent_transformer",
                                     "RecurrentTransformer"),
}


def native_model_class(model_type):
  """The model class of a non-Llama linjax checkpoint's model_type, else None."""
  if model_type not in NATIVE_MODELS:
    return None
  import importlib
  mod, name = NATIVE_MODELS[model_type]
  return getattr(importlib.import_module(mod), name)


__all__ = ["Llama", "LlamaConfig", "UnsupportedConfigError", "native_model_class"]
