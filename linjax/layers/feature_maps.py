"""`FeatureMap`: a feature map of `linjax.ops.feature_maps` with its per-head weights.

The math lives in `linjax.ops.feature_maps` (the one home of the definitions); this module
only holds the parameters of the learned kinds (t2r, hedgehog) as `FeatureMapParam`s,
initialised at W = I (and b = 0 for t2r), so a freshly linearized layer starts from
phi(x) = relu(x) / the LoLCATs Hedgehog map of x itself.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from linjax.layers.params import FeatureMapParam
from linjax.ops import feature_maps as fm

KINDS, LEARNED = fm.KINDS, fm.LEARNED


def feature_dim(kind: str, head_dim: int) -> int:
  return fm.output_dim(kind, head_dim)


class FeatureMap(nnx.Module):
  """phi over `num_heads` heads of size `head_dim`; learned kinds start at W = I, b = 0."""

  def __init__(self, kind: str, num_heads: int, head_dim: int, *, rngs: nnx.Rngs | None = None,
               param_dtype=jnp.float32):
    del rngs  # the learned maps start at the identity
    self.kind = fm.check_kind(kind)
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.out_dim = feature_dim(kind, head_dim)
    if kind in LEARNED:
      eye = jnp.broadcast_to(jnp.eye(head_dim, dtype=param_dtype), (num_heads, head_dim, head_dim))
      self.weight = FeatureMapParam(jnp.array(eye))
      self.bias = FeatureMapParam(jnp.zeros((num_heads, head_dim), param_dtype)) \
          if kind == "t2r" else None
    else:
      self.weight = None
      self.bias = None

  def params(self):
    """(weight, bias) as arrays (None where the kind has none): what `apply_with` takes."""
    return (None if self.weight is None else self.weight[...],
            None if self.bias is None else self.bias[...])

  def apply_with(self, params, x):
    """phi(x) with explicit (weight, bias): used under jax.checkpoint / grad in distillation."""
    return fm.apply(self.kind, x, *params)

  def __call__(self, x):
    return fm.apply(self.kind, x, *self.params())
