"""Training checkpoints: orbax `CheckpointManager` over model + optimizer + metadata.

One checkpoint per saved step under `workdir/checkpoints/<step>/`, with three items:
  model      `nnx.state(model)` as a pure dict (or, with `trainable_only`, the trainable
             params plus non-parameter state such as dropout RNG counters)
  optimizer  `nnx.state(optimizer)` (step count and optax state of the trainable params)
  meta       JSON: step, data position, the run's base RNG key, loss, config
Saves are asynchronous (`async_save`): the arrays are copied to host before `save` returns,
the files are written in the background, and orbax writes to a temporary directory that is
renamed when complete, so a process killed mid-save leaves no checkpoint that
`latest_step()` would return. `keep` bounds how many are kept. PRNG key arrays are stored as
their raw key data and re-wrapped on restore.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_saved(tree, like):
  return jax.tree.map(
      lambda x, l: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l)) if _is_key(l) else x,
      tree, like)


def _abstract(tree):
  def f(x):
    if _is_key(x):
      x = jax.random.key_data(x)
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  return jax.tree.map(f, tree)


def pure(state) -> dict:
  return nnx.to_pure_dict(state)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for (model state, optimizer state, meta)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "model": ocp.StandardCheckpointHandler(),
        "optimizer": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, model_state, opt_state, meta: dict) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(to_saveable(pure(model_state))),
        optimizer=ocp.args.StandardSave(to_saveable(pure(opt_state))),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, model_state, opt_state):
    """Restores into (copies of) the given states, keeping their shardings.

    Returns (model_state, opt_state, meta) as nnx States of the same structure."""
    mp, op = pure(model_state), pure(opt_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(mp)),
        optimizer=ocp.args.StandardRestore(_abstract(op)),
        meta=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(model_state, from_saved(out["model"], mp))
    nnx.replace_by_pure_dict(opt_state, from_saved(out["optimizer"], op))
    return model_state, opt_state, dict(out["meta"])

  def restore_model(self, step: int, model_state):
    """Restores only the model item into (a copy of) `model_state`."""
    mp = pure(model_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(mp))))
    nnx.replace_by_pure_dict(model_state, from_saved(out["model"], mp))
    return model_state

  def saved_keys(self, step: int, item: str = "model") -> list[str]:
    """Dotted paths of the arrays saved in `item` of checkpoint `step` (from its metadata)."""
    tree = self.manager.item_metadata(step)[item]
    flat = jax.tree_util.tree_flatten_with_path(
        dict(tree), is_leaf=lambda x: not isinstance(x, dict))[0]
    return [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in flat]

  def read_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
