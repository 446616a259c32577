"""Training: `train(config, workdir) -> summary`, the loop behind every linjax recipe.

  python -m linjax.train --config experiments/tiny_llama.py:cpu --workdir /tmp/run \
      --config.steps=20
  from linjax.train import train, base_config       # the same from a notebook

Modules: config (schema + validation), trainer (the loop), data (datasets, packing,
resumable order), corpus (the embedded default corpus), losses (the loss registry), optim
(optax + trainable filters), checkpoints (orbax), metrics (tqdm, TensorBoard, plots).
"""
_LAZY = {
    "train": ("linjax.train.trainer", "train"),
    "NonFiniteLossError": ("linjax.train.trainer", "NonFiniteLossError"),
    "base_config": ("linjax.train.config", "base_config"),
    "resolve": ("linjax.train.config", "resolve"),
    "ConfigError": ("linjax.train.config", "ConfigError"),
    "register_loss": ("linjax.train.losses", "register_loss"),
    "get_loss": ("linjax.train.losses", "get_loss"),
    "embedded_corpus": ("linjax.train.corpus", "embedded_corpus"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    import importlib
    mod, attr = _LAZY[name]
    return getattr(importlib.import_module(mod), attr)
  raise AttributeError(f"module 'linjax.train' has no attribute {name!r}")
