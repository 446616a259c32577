"""Optimizers and trainable-parameter filters from `config.optim` / `config.trainable`.

  tx, schedule = make_optimizer(config.optim, total_steps)
  wrt = trainable_filter("lora+feature_maps")
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)      # frozen params get no state, no update

AdamW (decoupled weight decay on >= 2-D params only), global-norm clipping, and a schedule:
"constant" (after linear warmup), "cosine" (warmup then cosine decay to `min_lr_ratio * lr`)
or "plateau" (warmup-constant times `optax.contrib.reduce_on_plateau`, which scales the
updates down by `plateau.factor` when the training loss stops improving for `patience`
steps; the trainer passes the loss as `value=`). Gradient accumulation is done by the train
step (`optim.grad_accum` micro-batches, one update), so a step is always one update.
"""
from __future__ import annotations

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


def lr_schedule(cfg, total_steps: int):
  lr, warm = float(cfg.lr), int(cfg.warmup_steps)
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0 if warm else lr, lr, warmup_steps=warm, decay_steps=max(total_steps, warm + 1),
        end_value=lr * float(cfg.min_lr_ratio))
  if warm:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
  return optax.constant_schedule(lr)


def _decay_mask(params):
  return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(cfg, total_steps: int):
  """(optax transformation, learning-rate schedule) for `config.optim`."""
  schedule = lr_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm and float(cfg.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.weight_decay), mask=_decay_mask))
  if cfg.schedule == "plateau":
    p = cfg.plateau
    parts.append(optax.contrib.reduce_on_plateau(
        factor=float(p.factor), patience=int(p.patience), cooldown=int(p.cooldown),
        rtol=float(p.rtol), accumulation_size=int(p.accumulation_size),
        min_scale=float(p.min_scale)))
  return optax.chain(*parts), schedule


def plateau_scale(opt_state) -> float | None:
  """The current reduce-on-plateau scale inside an optimizer state, if any."""
  found = []

  def visit(x):
    if hasattr(x, "scale") and hasattr(x, "best_value"):
      found.append(x.scale)
    return x

  jax.tree.map(visit, opt_state, is_leaf=lambda x: hasattr(x, "best_value"))
  return found[0] if found else None


def count_params(model, flt=nnx.Param) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, flt))))
