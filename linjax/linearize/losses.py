"""The linearization objectives that look inside the model (the training loop combines them
with the output objectives of `linjax.train.objectives`):

  attention_transfer(model, batch, kind)   per-layer attention transfer, teacher-forced: every
      distillable linearized layer sees the teacher's hidden states (its mixer returns the
      softmax output in distill mode, `linjax.layers.distill`) and contributes one loss,
      "mse" between the softmax and the student head outputs before o_proj (LoLCATs
      stage 1) or "xent" between attention weights (Hedgehog). Returns the per-layer losses.
  hidden_mse(student, teacher, batch)      mean squared error of the residual stream after
      every layer (and before the last norm), student vs teacher, over the real tokens.

`model` must be in distill mode (`linjax.linearize.set_distill`) for attention_transfer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def attention_transfer(model, batch):
  """Per-layer transfer losses [L] of a model in distill mode on a packed batch."""
  model(batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  leaves = jax.tree.leaves(nnx.pop(model, nnx.Intermediate))
  if not leaves:
    raise ValueError("no layer sowed a transfer loss: the model has no linearized layer in "
                     "distill mode (linjax.linearize.set_distill) with a mixer that supports "
                     "attention transfer")
  return jnp.stack([jnp.asarray(l, jnp.float32).reshape(()) for l in leaves])


def hidden_mse(student, teacher, batch):
  """Mean over layers and real tokens of the squared error of the residual stream."""
  kw = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  hs = student.hidden_states(batch["input_ids"], **kw)
  ht = teacher.hidden_states(batch["input_ids"], **kw)
  seg = batch.get("segment_ids")
  w = jnp.ones(batch["input_ids"].shape, jnp.float32) if seg is None else (seg > 0).astype(jnp.float32)
  errs = []
  for a, b in zip(hs["layer_inputs"][1:] + [hs["final"]], ht["layer_inputs"][1:] + [ht["final"]]):
    e = ((a.astype(jnp.float32) - jax.lax.stop_gradient(b).astype(jnp.float32)) ** 2).mean(-1)
    errs.append((e * w).sum() / jnp.maximum(w.sum(), 1.0))
  return jnp.stack(errs).mean()
