"""SUPRA (Mercat et al. 2024, "Linearizing Large Language Models").

    phi(x) = rotary(ReLU(x W + b)), W over the concatenated heads (one W shared by q and k
    under MHA, one each under GQA; W = I, b = 0 at init), a fixed per-head decay (ALiBi
    slopes by default), GroupNorm over each head's output instead of the softmax
    denominator. Registered: "supra".

    `norm_affine=True` (a linjax option): the GroupNorm gets a per-head, per-channel affine
    (`norm_scale`, `norm_bias`, FeatureMapParams starting at 1 and 0) that
    `linjax.linearize.calibrate` fits to the teacher's attention outputs (SUPRA's plain
    GroupNorm leaves its outputs 1-21x the teacher's RMS at init on SmolLM2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from linjax.layers.base import repeat_kv
from linjax.layers.linear_attention import LinearMixerBase, decay_log
from linjax.layers.mixers import register_mixer
from linjax.layers.params import FeatureMapParam


@register_mixer("supra")
class Supra(LinearMixerBase):
  normalize = "groupnorm"

  def __init__(self, config, layer_idx, *, rngs, decay="alibi", norm_affine=False,
               method="auto"):
    super().__init__(config, rngs=rngs, method=method)
    H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
    self.feat_dim = D
    self.tied = H == Hkv
    self.phi_q_w = FeatureMapParam(jnp.eye(H * D, dtype=jnp.float32))
    self.phi_q_b = FeatureMapParam(jnp.zeros((H * D,), jnp.float32))
    if not self.tied:
      self.phi_k_w = FeatureMapParam(jnp.eye(Hkv * D, dtype=jnp.float32))
      self.phi_k_b = FeatureMapParam(jnp.zeros((Hkv * D,), jnp.float32))
    self.norm_scale = FeatureMapParam(jnp.ones((H, D), jnp.float32)) if norm_affine else None
    self.norm_bias = FeatureMapParam(jnp.zeros((H, D), jnp.float32)) if norm_affine else None
    self.decay = decay
    self.log_decay = tuple(float(a) for a in decay_log(decay, H, layer_idx,
                                                        config.num_hidden_layers))

  def features(self, x, positions):
    q, k, v = self.project(x)
    B, T = x.shape[:2]
    H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
    qf = jax.nn.relu(q.reshape(B, T, H * D).astype(jnp.float32) @ self.phi_q_w[...] + self.phi_q_b[...])
    wk, bk = (self.phi_q_w, self.phi_q_b) if self.tied else (self.phi_k_w, self.phi_k_b)
    kf = jax.nn.relu(k.reshape(B, T, Hkv * D).astype(jnp.float32) @ wk[...] + bk[...])
    qf = self.rotate(qf.reshape(B, T, H, D), positions)
    kf = self.rotate(kf.reshape(B, T, Hkv, D), positions)
    kf, v = repeat_kv(kf, self.rep), repeat_kv(v, self.rep)
    return qf, kf, v, jnp.broadcast_to(jnp.asarray(self.log_decay, jnp.float32), (B, T, H)), None
