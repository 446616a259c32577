"""GLA (Yang et al. 2024): linear attention with a data-dependent per-key-channel decay.

    g_t = logsigmoid(W2 W1 x_t + b) / gate_logit_normalizer          [B, T, H, K], <= 0
    S_t = exp(g_t) * S_{t-1} + k_t^T v_t,    o_t = GroupNorm(q_t S_t / sqrt(K))

The low-rank gate projection (rank 16, like fla) is new: `FeatureMapParam`s. The bias starts
at `gate_bias_init`, so the initial memory is long. Registered: "gla".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from linjax.layers.linear_attention import LinearAttention
from linjax.layers.mixers import register_mixer
from linjax.layers.params import FeatureMapParam


@register_mixer("gla")
class GLA(LinearAttention):
  def __init__(self, config, layer_idx, *, rngs, feature_map="identity", normalize="groupnorm",
               gate_logit_normalizer=16.0, gate_low_rank_dim=16, gate_bias_init=4.0,
               rotary="before", method="auto", **kw):
    super().__init__(config, layer_idx, rngs=rngs, feature_map=feature_map, normalize=normalize,
                     rotary=rotary, method=method, **kw)
    self.gate_logit_normalizer = float(gate_logit_normalizer)
    F = self.feat_dim
    k1, k2 = jax.random.split(rngs.params())
    r = int(gate_low_rank_dim)
    self.gk_w1 = FeatureMapParam(jax.random.normal(k1, (self.hidden_size, r)) * self.hidden_size ** -0.5)
    self.gk_w2 = FeatureMapParam(jax.random.normal(k2, (r, self.num_heads * F)) * r ** -0.5 * 0.1)
    self.gk_b = FeatureMapParam(jnp.full((self.num_heads * F,), gate_bias_init, jnp.float32))

  def gates(self, x):
    B, T, _ = x.shape
    z = (x.astype(jnp.float32) @ self.gk_w1[...]) @ self.gk_w2[...] + self.gk_b[...]
    return jax.nn.log_sigmoid(z).reshape(B, T, self.num_heads, self.feat_dim) / self.gate_logit_normalizer

  def features(self, x, positions):
    qf, kf, v, _, _ = super().features(x, positions)
    return qf, kf, v, self.gates(x), None
