"""Liger (Lan et al. 2025): GLA with gates pooled from the key projection, plus window softmax.
No new parameters. Registered: "liger".

  gates: average pooling of k ([B, T, Hkv * D]) to Hkv * D values (the identity at that size),
         log-gate g = logsigmoid(k) / gate_logit_normalizer (16), per key channel;
  phi:   softmax over the head dim, on q and k before rotary;
  y = mix * softmax attention over a `window`-token window (rotary q, k; plus `num_sinks`
      attention sinks, a linjax option, 0 in the paper)
      + (1 - mix) * GLA(phi(q), phi(k), v, g) with scale 1,
  mix = 0.5. The GLA branch is unnormalised as in Liger's code; `normalize=True` (a linjax
  option) divides it by its own running key-sum denominator phi(q_t) . z_t. `learn_mix=True`
  (a linjax option) learns the mix per head (`window_mix`, a FeatureMapParam starting at
  `mix`): mix = 1 makes the layer exactly window softmax attention at step 0.

Decode state: the GLA state [B, H, D, D(+1)] and a cache of `num_sinks` + `window` rotary keys
/ values. A T-token prompt runs the GLA op once from the state and the window attention over
(cache, new tokens) blockwise; one token is the T = 1 case (`gla_step`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from linjax import ops
from linjax.layers.base import (QKVO, attention_method, cached_attention, init_kv_cache,
                                repeat_kv, token_mask, write_kv_cache)
from linjax.layers.distill import DistillMixin
from linjax.layers.mixers import register_mixer
from linjax.layers.params import FeatureMapParam
from linjax.parallel import sequence as sp

F32 = jnp.float32


@register_mixer("liger")
class LigerAttention(DistillMixin, QKVO):

  def __init__(self, config, layer_idx, *, rngs, window=64, gate_logit_normalizer=16.0,
               mix=0.5, num_sinks=0, normalize=False, learn_mix=False, method="auto"):
    super().__init__(config, rngs=rngs, method=method)
    if int(window) < 1:
      raise ValueError(f"Liger `window` must be >= 1, got {window}")
    if not 0.0 <= float(mix) <= 1.0:
      raise ValueError(f"Liger `mix` must be in [0, 1], got {mix}")
    if int(num_sinks) < 0:
      raise ValueError(f"Liger `num_sinks` must be >= 0, got {num_sinks}")
    self.window = int(window)
    self.gate_logit_normalizer = float(gate_logit_normalizer)
    self.mix = float(mix)
    self.num_sinks = int(num_sinks)
    self.normalize = bool(normalize)
    self.window_mix = (FeatureMapParam(jnp.full((self.num_heads,), self.mix, F32))
                       if learn_mix else None)

  def _mix(self, o_sw, o_lin):
    m = self.mix if self.window_mix is None else self.window_mix[...][None, None, :, None]
    return m * o_sw.astype(F32) + (1 - m) * o_lin

  def _features(self, q, k, v):
    g = jax.nn.log_sigmoid(k.astype(F32)) / self.gate_logit_normalizer
    fq = jax.nn.softmax(q.astype(F32), -1)
    fk = jax.nn.softmax(k.astype(F32), -1)
    v = repeat_kv(v, self.rep).astype(F32)
    if self.normalize:
      v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), F32)], -1)
    return fq, repeat_kv(fk, self.rep), v, repeat_kv(g, self.rep)

  def _post(self, o_lin):
    o_lin = o_lin.astype(F32)
    return o_lin[..., :-1] / (o_lin[..., -1:] + 1e-6) if self.normalize else o_lin

  def init_cache(self, batch_size, max_len=None, dtype=F32):
    c = init_kv_cache(batch_size, self.num_sinks + self.window, self.num_kv_heads, self.head_dim)
    D = self.head_dim
    c["state"] = jnp.zeros((batch_size, self.num_heads, D, D + int(self.normalize)), F32)
    return c

  def heads(self, x, *, positions, segment_ids=None, cache=None):
    q, k, v = self.project(x)
    fq, fk, vl, g = self._features(q, k, v)
    qr, kr = self.rotate(q, positions), self.rotate(k, positions)
    W = self.window
    if cache is None:
      o_lin, _ = sp.gla(fq, fk, vl, g, scale=1.0, segment_ids=segment_ids, method=self.method)
      o_sw = sp.attention(qr, kr, v, causal=True, window=W, num_sinks=self.num_sinks,
                          segment_ids=segment_ids, q_positions=positions,
                          kv_positions=positions, method=attention_method(self.method))
      return self._mix(o_sw, self._post(o_lin)), None
    upd = token_mask(x, segment_ids)
    fk = jnp.where(upd[:, :, None, None], fk, 0.0)
    g = jnp.where(upd[:, :, None, None], g, 0.0)
    if x.shape[1] == 1:
      o_lin, S = ops.gla_step(cache["state"], fq, fk, vl, g, scale=1.0)
    else:
      o_lin, S = ops.gla(fq, fk, vl, g, scale=1.0, initial_state=cache["state"],
                         output_final_state=True, method=self.method)
    seg = upd.astype(jnp.int32)
    o_sw, _, _ = cached_attention(qr, kr, v, cache, positions=positions, segment_ids=seg,
                                  window=W, num_sinks=self.num_sinks,
                                  method="parallel" if self.method in ("parallel", "recurrent")
                                  else "chunk")
    new = write_kv_cache({n: cache[n] for n in ("k", "v", "pos", "seg")}, kr, v, positions, seg,
                         window=W, num_sinks=self.num_sinks)
    new["state"] = S.astype(F32)
    return self._mix(o_sw, self._post(o_lin)), new

