"""Attention transfer inside a mixer: the teacher's softmax heads and the per-layer loss.

`mixer.distill = "mse" | "xent"` (a switch separate from `method`) makes a full-sequence call
return the *teacher's* softmax output, through the base o_proj and without gradient (so the
next layer sees exactly the teacher's hidden states and no loss reaches across layers), and
sow this layer's attention-transfer loss as `nnx.Intermediate` "transfer_loss":

  mse   mean squared error between the softmax and the student head outputs before o_proj
        (LoLCATs stage 1)
  xent  cross-entropy between the softmax weights and the student's normalised weights
        (Hedgehog)

The teacher is softmax attention with the projections' base weights (a LoRA adapter on q / k
/ v trains the student only), computed under `jax.checkpoint`, so no T x T tensor outlives
the layer. "mse" runs the student as the mixer's own full pass (any mixer, any method);
"xent" needs the student's weights, from `student_params()` and
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


def teacher_output(mixer, y, x):
  """What a layer passes on in distillation mode: the teacher's heads `y` through the base
  o_proj, without gradient. So the next layer's input is exactly the teacher's hidden state
  and each layer's transfer loss reaches only its own weights (an adapter on o_proj, or on a
  softmax layer, cannot move the hidden states the later layers are scored on)."""
  return jax.lax.stop_gradient(mixer.out(y, x, base=True))


class DistillMixin:
  """See the module docstring. Needs q/k/v/o_proj, `rotate`, `rep`, `heads` (and, for "xent",
  `student_params` / `student_quadratic`)."""

  distill = None

  def teacher_qkv(self, x, positions):
    """Rotary q, and k, v per query head, from the projections' base weights (LoRA left out)."""
    q, k, v = self.project(x, base=True)   # (Qwen3's q/k norms are the teacher's too)
    return (self.rotate(q, positions), repeat_kv(self.rotate(k, positions), self.rep),
            repeat_kv(v, self.rep))

  def teacher_heads(self, x, positions, segment_ids=None):
    """The softmax teacher's heads [B, T, H, V] and weights [B, H, T, T] on input x (no
    gradient), under jax.checkpoint."""
    q, k, v = self.teacher_qkv(x, positions)
    vis = segment_masks(positions, segment_ids)
    scale = self.head_dim ** -0.5
    teacher = jax.checkpoint(lambda q, k, v: softmax_heads(q, k, v, vis=vis, scale=scale))
    ty, tp = teacher(q, k, v)
    return jax.lax.stop_gradient(ty), jax.lax.stop_gradient(tp)

  def _distill_call(self, x, positions, segment_ids):
    kind = self.distill
    row = None if segment_ids is None else (segment_ids > 0).astype(jnp.float32)
    ty, tp = self.teacher_heads(x, positions, segment_ids)
    if kind == "mse":
      # the student: the mixer's own full pass (its method) on the same, teacher-forced input
      sy, _ = self.heads(x, positions=positions, segment_ids=segment_ids)
      loss = transfer_loss(None, None, sy, ty, "mse", row)
    else:
      if not hasattr(self, "student_quadratic"):
        raise ValueError(f"mixer {getattr(self, 'mixer_name', type(self).__name__)!r} has no "
                         "attention weights: attention transfer by 'xent' needs them (use "
                         "'mse')")

      q, k, v = self.teacher_qkv(x, positions)
      vis = segment_masks(positions, segment_ids)

      @jax.checkpoint
      def student(params, q, k, v):
        return self.student_quadratic(params, q, k, v, positions, vis)
      sy, sw = student(self.student_params(), q, k, v)
      loss = transfer_loss(sw, tp, sy, ty, "xent", row)
    self.sow(nnx.Intermediate, "transfer_loss", loss)
    return teacher_output(self, ty, x)
