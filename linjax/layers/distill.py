"""Attention transfer inside a mixer: the teacher's softmax heads and the per-layer loss.

`mixer.distill = "mse" | "xent"` (a switch separate from `method`) makes a full-sequence call
return the *teacher's* softmax output (so the next layer sees teacher hidden states) and sow
this layer's attention-transfer loss as `nnx.Intermediate` "transfer_loss":

  mse   mean squared error between the softmax and the student head outputs before o_proj
        (LoLCATs stage 1)
  xent  cross-entropy between the softmax weights and the student's normalised weights
        (Hedgehog)

The loss is computed under `jax.checkpoint`, so no T x T tensor outlives the layer. A mixer
that supports it implements `student_params()` and
`student_quadratic(params, q, k, v, positions, vis) -> (y [B,T,H,V], weights [B,H,T,T])`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linjax.layers.base import NEG, repeat_kv, segment_masks

DISTILL_KINDS = ("mse", "xent")


def softmax_heads(q, k, v, *, vis, scale):
  """Teacher: causal softmax attention per head. Returns (y [B,T,H,V], p [B,H,T,T])."""
  f32 = jnp.float32
  s = jnp.einsum("bihd,bjhd->bhij", q.astype(f32), k.astype(f32)) * scale
  s = jnp.where(vis[:, None], s, NEG)
  p = jax.nn.softmax(s, -1)
  p = jnp.where(vis[:, None], p, 0.0)
  return jnp.einsum("bhij,bjhv->bihv", p, v.astype(f32)), p


def transfer_loss(student_w, teacher_p, student_y, teacher_y, kind, row_mask=None):
  """Attention-transfer loss of one layer: "mse" on head outputs or "xent" on weights."""
  if kind == "mse":
    err = ((student_y - teacher_y) ** 2).mean(-1).mean(-1)  # [B, T]
  elif kind == "xent":
    # weights of masked (never visible) pairs are 0 in both; log(0) there is multiplied by 0
    logw = jnp.log(jnp.where(teacher_p > 0, student_w, 1.0))
    err = -(teacher_p * logw).sum(-1).mean(1)               # [B, T]
  else:
    raise ValueError(f"unknown transfer loss {kind!r}; one of {DISTILL_KINDS}")
  if row_mask is None:
    return err.mean()
  return (err * row_mask).sum() / jnp.maximum(row_mask.sum(), 1)


class DistillMixin:
  """See the module docstring. Mixers set `distill = None` by default."""

  distill = None

  def _distill_call(self, x, positions, segment_ids):
    q, k, v = self.project(x)
    q = self.rotate(q, positions)
    k = repeat_kv(self.rotate(k, positions), self.rep)
    v = repeat_kv(v, self.rep)
    vis = segment_masks(positions, segment_ids)
    scale = self.head_dim ** -0.5
    params = self.student_params()
    kind = self.distill

    @jax.checkpoint
    def layer_loss(params, q, k, v):
      ty, tp = softmax_heads(q, k, v, vis=vis, scale=scale)
      sy, sw = self.student_quadratic(params, q, k, v, positions, vis)
      row = None if segment_ids is None else (segment_ids > 0).astype(jnp.float32)
      return transfer_loss(sw, jax.lax.stop_gradient(tp), sy, jax.lax.stop_gradient(ty),
                           kind, row), ty

    loss, ty = layer_loss(params, q, k, v)
    self.sow(nnx.Intermediate, "transfer_loss", loss)
    return self.out(jax.lax.stop_gradient(ty), x)
