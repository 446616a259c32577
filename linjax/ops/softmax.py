"""Softmax attention for the hybrids and the teacher: full, causal, sliding window, sinks.

Layout [B, T, H, D] like every op. GQA: k and v may have fewer heads than q (Hq % Hkv == 0).
Logits and the softmax are float32 whatever the input dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from linjax.ops._checks import check_rank, check_same


def attention_mask(q_positions, kv_positions, *, causal=True, window=None, num_sinks=0,
                   q_segment_ids=None, kv_segment_ids=None):
  """Boolean visibility [B, T, S]: may query at q_positions see the key at kv_positions?

  window: a query sees the `window` most recent keys including itself (i - j < window);
  num_sinks: keys at positions < num_sinks stay visible outside the window (StreamingLLM).
  Segment ids: keys are visible only within the same segment; a kv segment id < 0 marks an
  empty cache slot that nobody sees.
  """
  qp = q_positions[:, :, None]
  kp = kv_positions[:, None, :]
  vis = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
  if causal:
    vis &= kp <= qp
  if window is not None:
    vis &= (qp - kp < window) | (kp < num_sinks)
  if kv_segment_ids is not None:
    vis &= kv_segment_ids[:, None, :] >= 0
    if q_segment_ids is not None:
      vis &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return vis


def attention(q, k, v, *, causal=True, window=None, num_sinks=0, segment_ids=None,
              kv_segment_ids=None, q_positions=None, kv_positions=None, scale=None,
              mask=None):
  """Masked softmax attention.

  Args:
    q: [B, T, Hq, D]; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv] with Hq % Hkv == 0.
    causal / window / num_sinks: see `attention_mask`.
    segment_ids: [B, T] packed-document ids of the queries (and of the keys when
      kv_segment_ids is not given and S == T).
    q_positions / kv_positions: [B, T] / [B, S] absolute positions. Default: arange, with the
      queries aligned to the end of the keys (decode: T=1 query after S-1 cached keys).
    mask: optional extra boolean mask [B, T, S] (True = visible), and-ed with the rest.
  Returns:
    o: [B, T, Hq, Dv] in v's dtype. A query that sees no key gets zeros.
  """
  check_rank("q", q, 4, "[B, T, Hq, D]")
  check_rank("k", k, 4, "[B, S, Hkv, D]")
  check_rank("v", v, 4, "[B, S, Hkv, Dv]")
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  check_same("k", k.shape[:2] + (D,), "v", (B, S, k.shape[-1]), what="[B, S, ., D] of k vs q")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must be [B, S, Hkv, Dv] with k's leading dims {k.shape[:3]}, got {v.shape}")
  if Hq % Hkv:
    raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
  scale = D ** -0.5 if scale is None else scale
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(T) + (S - T), (B, T))
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  if segment_ids is not None and kv_segment_ids is None:
    if S != T:
      raise ValueError("segment_ids without kv_segment_ids needs as many keys as queries")
    kv_segment_ids = segment_ids
  vis = attention_mask(q_positions, kv_positions, causal=causal, window=window,
                       num_sinks=num_sinks, q_segment_ids=segment_ids,
                       kv_segment_ids=kv_segment_ids)
  if mask is not None:
    vis &= mask
  rep = Hq // Hkv
  qg = q.reshape(B, T, Hkv, rep, D)
  s = jnp.einsum("bthrd,bshd->bhrts", qg, k, preferred_element_type=jnp.float32) * scale
  vis = vis[:, None, None]
  s = jnp.where(vis, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  p = jnp.where(vis.any(-1, keepdims=True), p, 0.0)
  o = jnp.einsum("bhrts,bshd->bthrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(B, T, Hq, v.shape[-1]).astype(v.dtype)
