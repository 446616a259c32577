"""Llama's gated MLP, and `dense`, the Linear builder every linjax layer uses.

`dense` attaches logical axis names to the kernel and bias (`nnx.with_partitioning`, no
eager sharding: `linjax.parallel` maps the names to mesh axes when a mesh is used).
Kernels are [in, out] (HF stores [out, in]; the converters transpose).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def partitioned(init, axes):
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def dense(in_features: int, out_features: int, axes: tuple, *, use_bias: bool = False,
          dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs, std: float = 0.02,
          precision=None) -> nnx.Linear:
  """An `nnx.Linear` with kernel axes `axes` ([in, out]) and bias axis `axes[1]`."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      precision=precision,
      kernel_init=partitioned(nnx.initializers.normal(std), axes),
      bias_init=partitioned(nnx.initializers.zeros_init(), (axes[1],)),
      rngs=rngs)


class LlamaMLP(nnx.Module):
  """down_proj(act(gate_proj(x)) * up_proj(x)), HF attribute names."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    h, m = config.hidden_size, config.intermediate_size
    kw = dict(use_bias=config.mlp_bias, dtype=config.jnp_dtype,
              param_dtype=config.jnp_param_dtype, rngs=rngs,
              std=config.initializer_range)
    self.gate_proj = dense(h, m, ("embed", "mlp"), **kw)
    self.up_proj = dense(h, m, ("embed", "mlp"), **kw)
    self.down_proj = dense(m, h, ("mlp", "embed"), **kw)
    self.act = config.hidden_act

  def __call__(self, x):
    return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))
