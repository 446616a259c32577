"""Optimizers and trainable-parameter filters from a stage's `optim` / `trainable`.

  tx = make_optimizer(stage.optim)
  wrt = trainable_filter("lora+feature_maps")
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)      # frozen params get no state, no update
  rate = learning_rate(stage.optim, step, progress)  # set each step: set_learning_rate(...)

AdamW (decoupled weight decay on >= 2-D params only) behind global-norm clipping, its learning
rate injected (`optax.inject_hyperparams`) and set every step from `learning_rate`: linear
warmup over `warmup_steps`, then "constant", "cosine" (from lr down to min_lr_ratio * lr as
the stage's progress goes 0 -> 1, progress being the largest of steps / step budget, tokens /
token budget and seconds / time budget, so a time-limited stage still decays fully) or
"plateau" (constant, times `optax.contrib.reduce_on_plateau`, which scales the updates down by
`plateau.factor` when the training loss stops improving for `patience` steps; the train step
passes the loss as `value=`). Gradient accumulation is done by the train step, so a step is
always one update.
"""
from __future__ import annotations

import math

import jax
import optax
from flax import nnx

from linjax.layers.params import FeatureMapParam, LoRAParam
from linjax.train.config import trainable_parts


def _is_norm(path, value) -> bool:
  return isinstance(value, nnx.Param) and any("norm" in str(p) for p in path)


def trainable_filter(trainable: str):
  """An nnx filter for "all" | "lora" | "feature_maps" | "norms" joined by "+"."""
  parts = trainable_parts(trainable)
  if "all" in parts:
    return nnx.Param
  table = {"lora": LoRAParam, "feature_maps": FeatureMapParam, "norms": _is_norm}
  filters = [table[p] for p in parts]
  return filters[0] if len(filters) == 1 else nnx.Any(*filters)


def learning_rate(cfg, step: int, progress: float) -> float:
  """The rate at `step` (0-based) with the stage `progress` in [0, 1] (see module docstring)."""
  lr, warm = float(cfg.lr), int(cfg.warmup_steps)
  if step < warm:
    return lr * (step + 1) / warm
  if cfg.schedule == "cosine":
    end = float(cfg.min_lr_ratio)
    p = min(max(progress, 0.0), 1.0)
    return lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * p)))
  return lr


def _decay_mask(params):
  return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(cfg):
  """The optax transformation of a stage's `optim` (the rate is set per step)."""
  parts = [optax.clip_by_global_norm(float(cfg.clip_norm)) if float(cfg.clip_norm) > 0
           else optax.identity(),
           optax.inject_hyperparams(optax.adamw)(
               learning_rate=float(cfg.lr), b1=float(cfg.b1), b2=float(cfg.b2),
               eps=float(cfg.eps), weight_decay=float(cfg.weight_decay), mask=_decay_mask)]
  if cfg.schedule == "plateau":
    p = cfg.plateau
    parts.append(optax.contrib.reduce_on_plateau(
        factor=float(p.factor), patience=int(p.patience), cooldown=int(p.cooldown),
        rtol=float(p.rtol), accumulation_size=int(p.accumulation_size),
        min_scale=float(p.min_scale)))
  return optax.chain(*parts)


def set_learning_rate(optimizer, rate):
  """Set the injected AdamW rate of an `nnx.Optimizer` built from `make_optimizer`."""
  optimizer.opt_state[1].hyperparams["learning_rate"][...] = rate


def plateau_scale(opt_state) -> float | None:
  """The current reduce-on-plateau scale inside an optimizer state, if any."""
  found = []

  def visit(x):
    if hasattr(x, "scale") and hasattr(x, "best_value"):
      found.append(x.scale)
    return x

  jax.tree.map(visit, opt_state, is_leaf=lambda x: hasattr(x, "best_value"))
  return found[0] if found else None
