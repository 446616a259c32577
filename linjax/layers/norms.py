"""RMSNorm exactly as transformers' LlamaRMSNorm (statistics in float32)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in float32, cast back to x's dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = float(eps)
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                            eager_sharding=False)

  def __call__(self, x):
    in_dtype = x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    out_dtype = self.dtype or in_dtype
    return self.weight[...].astype(out_dtype) * h.astype(in_dtype).astype(out_dtype)
