"""DeltaNet (Yang et al. 2024) and gated DeltaNet: the delta rule as a token mixer.

    q, k = l2norm(silu(.)) of the projections (after rotary), beta = sigmoid(x W_b + b_b)
    (x 2 with allow_neg_eigval: eigenvalues of (I - beta k k^T) in (-1, 1]),
    gated: g = -exp(A_log) softplus(x W_a + dt_bias) (Mamba2-style, <= 0)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t,   o_t = q_t S_t / sqrt(K)
    output: per-head RMSNorm with a learned scale.

Registered: "deltanet", "gated_deltanet".
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from linjax.layers.feature_maps import FeatureMap, feature_dim
from linjax.layers.linear_attention import NORMALIZE, LinearMixerBase
from linjax.layers.mixers import register_mixer
from linjax.layers.params import FeatureMapParam


@register_mixer("deltanet")
class DeltaNet(LinearMixerBase):
  delta = True

  def __init__(self, config, layer_idx, *, rngs, feature_map="silu_l2", allow_neg_eigval=False,
               gated=False, rotary="before", normalize="rmsnorm", method="auto"):
    super().__init__(config, rngs=rngs, method=method)
    if normalize not in NORMALIZE or normalize == "denominator":
      raise ValueError(f"DeltaNet `normalize` must be 'rmsnorm', 'groupnorm' or None, got "
                       f"{normalize!r}")
    if rotary not in ("before", "none"):
      raise ValueError(f"DeltaNet `rotary` must be 'before' or 'none', got {rotary!r}")
    self.normalize = normalize
    self.rotary = rotary
    self.allow_neg_eigval = bool(allow_neg_eigval)
    self.gated = bool(gated)
    self.feature_map_q = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feature_map_k = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feat_dim = feature_dim(feature_map, self.head_dim)
    H, hidden = self.num_heads, self.hidden_size
    k1, k2 = jax.random.split(rngs.params())
    self.b_w = FeatureMapParam(jax.random.normal(k1, (hidden, H)) * hidden ** -0.5)
    self.b_b = FeatureMapParam(jnp.zeros((H,), jnp.float32))
    if self.gated:
      self.a_w = FeatureMapParam(jax.random.normal(k2, (hidden, H)) * hidden ** -0.5)
      # Mamba2-style: A in [1, 16], dt in [1e-3, 1e-1] spread over heads.
      self.A_log = FeatureMapParam(jnp.log(jnp.linspace(1.0, 16.0, H)))
      dt = jnp.exp(jnp.linspace(math.log(1e-3), math.log(1e-1), H))
      self.dt_bias = FeatureMapParam(dt + jnp.log(-jnp.expm1(-dt)))
    if normalize == "rmsnorm":
      self.o_norm = FeatureMapParam(jnp.ones((self.head_dim,), jnp.float32))

  @property
  def scale(self):
    return self.feat_dim ** -0.5

  def features(self, x, positions):
    qf, kf, v = self.mapped_qkv(x, positions)
    xf = x.astype(jnp.float32)
    beta = jax.nn.sigmoid(xf @ self.b_w[...] + self.b_b[...])
    if self.allow_neg_eigval:
      beta = 2.0 * beta
    g = None
    if self.gated:
      g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(xf @ self.a_w[...] + self.dt_bias[...])
    return qf, kf, v, g, beta


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
  def __init__(self, config, layer_idx, *, rngs, **kw):
    kw.setdefault("gated", True)
    super().__init__(config, layer_idx, rngs=rngs, **kw)
