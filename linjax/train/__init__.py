"""Training: `train(config, workdir) -> summary`, the one loop behind every linjax recipe.

  python -m linjax.train --config experiments/tiny_llama.py:cpu --workdir /tmp/run \
      --config.stages.train.steps=20
  from linjax.train import train, base_config, stage, stages   # the same from a notebook

Modules: config (schema + validation: a run is a list of stages), trainer (the loop),
objectives (ce, kl, z_loss, attention transfer, hidden-state MSE), optim (optax + trainable
filters), checkpoints (orbax), metrics (tqdm, TensorBoard, plots). The data pipeline is
`linjax.data`.
"""
_LAZY = {
    "train": ("linjax.train.trainer", "train"),
    "NonFiniteLossError": ("linjax.train.trainer", "NonFiniteLossError"),
    "base_config": ("linjax.train.config", "base_config"),
    "stage": ("linjax.train.config", "stage"),
    "stages": ("linjax.train.config", "stages"),
    "resolve": ("linjax.train.config", "resolve"),
    "ConfigError": ("linjax.train.config", "ConfigError"),
    "make_objective": ("linjax.train.objectives", "make_objective"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    import importlib
    mod, attr = _LAZY[name]
    return getattr(importlib.import_module(mod), attr)
  raise AttributeError(f"module 'linjax.train' has no attribute {name!r}")
