"""Feature maps phi for linear attention, as NNX modules (learned ones hold `FeatureMapParam`s).

Inputs are per-head, `[..., H, D]`; outputs `[..., H, F]`. Kinds:

  identity   x
  elu        elu(x) + 1                                  (Katharopoulos et al.)
  relu       relu(x)
  softmax    softmax(x) over the head dim                (Liger)
  silu_l2    l2norm(silu(x))                             (DeltaNet)
  l2         l2norm(x)
  dpfp       DPFP with nu=1: r = [relu(x), relu(-x)], r * roll(r, 1)  (F = 2D)
  t2r        relu(x W_h + b_h), W_h = I at init          (T2R, learned)
  hedgehog   [softmax(x W_h), softmax(-x W_h)], W_h = I  (Hedgehog / LoLCATs, learned, F = 2D)

The pure math lives in `feature_map_fn`; `FeatureMap` adds the per-head weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linjax.layers.params import FeatureMapParam

KINDS = ("identity", "elu", "relu", "softmax", "silu_l2", "l2", "dpfp", "t2r", "hedgehog")
LEARNED = ("t2r", "hedgehog")


def _l2norm(x, eps=1e-6):
  return x * jax.lax.rsqrt((x * x).sum(-1, keepdims=True) + eps)


def feature_dim(kind: str, head_dim: int) -> int:
  return 2 * head_dim if kind in ("hedgehog", "dpfp") else head_dim


def feature_map_fn(kind: str, x, weight=None, bias=None, eps: float = 1e-12):
  """phi(x) for x [..., H, D]; `weight` [H, D, D'] / `bias` [H, D'] for the learned kinds."""
  x = x.astype(jnp.float32)
  if kind == "identity":
    return x
  if kind == "elu":
    return jax.nn.elu(x) + 1.0
  if kind == "relu":
    return jax.nn.relu(x)
  if kind == "softmax":
    return jax.nn.softmax(x, axis=-1)
  if kind == "silu_l2":
    return _l2norm(jax.nn.silu(x))
  if kind == "l2":
    return _l2norm(x)
  if kind == "dpfp":
    r = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], -1)
    return r * jnp.roll(r, 1, axis=-1)
  if kind in LEARNED:
    z = jnp.einsum("...hd,hdf->...hf", x, weight.astype(jnp.float32))
    if bias is not None:
      z = z + bias.astype(jnp.float32)
    if kind == "t2r":
      return jax.nn.relu(z)
    # LoLCATs `softmax_dim` (fullspace), clamped like theirs so no feature is exactly 0.
    return jnp.maximum(jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1), eps)
  raise ValueError(f"unknown feature map {kind!r}; one of {KINDS}")


class FeatureMap(nnx.Module):
  """phi over `num_heads` heads of size `head_dim`; learned kinds start at W = I, b = 0."""

  def __init__(self, kind: str, num_heads: int, head_dim: int, *, rngs: nnx.Rngs | None = None,
               param_dtype=jnp.float32):
    if kind not in KINDS:
      raise ValueError(f"unknown feature map {kind!r}; one of {KINDS}")
    self.kind = kind
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

  def __call__(self, x):
    w = None if self.weight is None else self.weight[...]
    b = None if self.bias is None else self.bias[...]
    return feature_map_fn(self.kind, x, w, b)
