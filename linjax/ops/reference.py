"""Token-by-token recurrences with `lax.scan` in float32: the ground truth for every method.

Nothing here is fast; everything here is obviously the math written in each docstring. Every other
method (parallel, chunk, assoc_scan, pallas, sequence parallel) is tested against these.

Conventions (flash-linear-attention's):
  q, k: [B, T, H, K];  v: [B, T, H, V];  state: [B, H, K, V] float32.
  g (log forget gate, <= 0): None, [B, T, H] (per head) or [B, T, H, K] (per key channel).
  beta (delta rule): [B, T, H].
  cu_seqlens: [N + 1] int offsets of N packed sequences along T (then B must be 1);
    initial_state / final_state are then [N, H, K, V] and the state resets at each start.
  segment_ids: [B, T] int, packed documents in a padded batch: the state resets to zero
    wherever the id changes along T; initial_state is the state before each row's first
    segment and the final state is the state after its last.

  gla:        S_t = exp(g_t) * S_{t-1} + k_t^T v_t                         o_t = scale q_t S_t
  delta_rule: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t   o_t = scale q_t S_t
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _seq_layout(cu_seqlens, T):
  """Per-token sequence id and start / end flags for a packed batch."""
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  t = jnp.arange(T, dtype=jnp.int32)
  # seq id = number of starts <= t, minus one; empty sequences share a start with the next.
  seq_id = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
  is_start = t == cu[seq_id]
  is_end = t == cu[seq_id + 1] - 1
  return seq_id, is_start, is_end


def _scan(step, q, k, v, extra, initial_state, output_final_state, cu_seqlens,
          segment_ids=None):
  """Shared driver: runs `step(S, inputs_t) -> (S, o_t)` over T for every batch row."""
  B, T, H, K = q.shape
  if segment_ids is not None and cu_seqlens is not None:
    raise ValueError("pass either `cu_seqlens` or `segment_ids`, not both")
  V = v.shape[-1]
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  q, k, v = f32(q), f32(k), f32(v)
  extra = jax.tree.map(f32, extra)
  if cu_seqlens is None:
    n_states = B
  else:
    if B != 1:
      raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got q with B={B}")
    n_states = int(cu_seqlens.shape[0]) - 1
  if initial_state is None:
    init = jnp.zeros((n_states, H, K, V), jnp.float32)
  else:
    init = initial_state.astype(jnp.float32)

  if cu_seqlens is None:
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    new = jnp.concatenate([jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)

    def per_row(q, k, v, extra, s0, new):
      def body(S, xs):
        reset, xt = xs
        return step(jnp.where(reset, 0.0, S), xt)
      S, o = lax.scan(body, s0, (new, (q, k, v, extra)))
      return o, S
    o, S = jax.vmap(per_row)(q, k, v, extra, init, new)
  else:
    seq_id, is_start, is_end = _seq_layout(cu_seqlens, T)
    def body(carry, xs):
      S, finals = carry
      sid, start, end, xt = xs
      S = jnp.where(start, init[sid], S)
      S, o = step(S, xt)
      finals = finals.at[sid].set(jnp.where(end, S, finals[sid]))
      return (S, finals), o
    xs = (seq_id, is_start, is_end, jax.tree.map(lambda x: x[0], (q, k, v, extra)))
    (_, S), o = lax.scan(body, (init[0], init), xs)
    o = o[None]
  return o.astype(v.dtype), (S if output_final_state else None)


def gla(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, segment_ids=None):
  """Gated linear attention, one token at a time. Returns (o [B,T,H,V] float32, state)."""
  K = q.shape[-1]
  scale = K ** -0.5 if scale is None else scale

  def step(S, xs):
    qt, kt, vt, gt = xs  # [H,K], [H,K], [H,V], None | [H] | [H,K]
    if gt is not None:
      decay = jnp.exp(gt)
      S = S * (decay[:, None, None] if decay.ndim == 1 else decay[:, :, None])
    S = S + kt[:, :, None] * vt[:, None, :]
    return S, scale * jnp.einsum("hk,hkv->hv", qt, S)

  return _scan(step, q, k, v, g, initial_state, output_final_state, cu_seqlens, segment_ids)


def delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None,
               output_final_state=False, cu_seqlens=None, segment_ids=None):
  """(Gated) delta rule, one token at a time. Returns (o [B,T,H,V] float32, state)."""
  K = q.shape[-1]
  scale = K ** -0.5 if scale is None else scale

  def step(S, xs):
    qt, kt, vt, (bt, gt) = xs
    if gt is not None:
      S = S * jnp.exp(gt)[:, None, None]
    # (I - b k k^T) S + b k v^T  ==  S + b k (v - k^T S)^T
    pred = jnp.einsum("hk,hkv->hv", kt, S)
    S = S + bt[:, None, None] * kt[:, :, None] * (vt - pred)[:, None, :]
    return S, scale * jnp.einsum("hk,hkv->hv", qt, S)

  return _scan(step, q, k, v, (beta, g), initial_state, output_final_state, cu_seqlens,
               segment_ids)


def softmax_attention(q, k, v, *, causal=True, window=None, num_sinks=0, segment_ids=None,
                      scale=None, positions=None):
  """Plain masked softmax attention in float32, one query at a time (GQA by head repeat).

  q: [B, T, Hq, D], k/v: [B, T, Hkv, D]; with p = positions (default 0..T-1 per row), key j
  is visible to query i when j <= i (causal), p_i - p_j < window (sliding window) or
  p_j < num_sinks (attention sinks: with positions restarting per packed document, every
  document has its own), and segments match.
  """
  B, T, Hq, D = q.shape
  rep = Hq // k.shape[2]
  k = jnp.repeat(k.astype(jnp.float32), rep, axis=2)
  v = jnp.repeat(v.astype(jnp.float32), rep, axis=2)
  scale = D ** -0.5 if scale is None else scale
  j = jnp.arange(T)

  def one_query(i, qi, seg_i, pos_i, k, v, seg, pos):
    vis = jnp.ones((T,), bool)
    if causal:
      vis &= j <= i
    if window is not None:
      vis &= (pos_i - pos < window) | (pos < num_sinks)
    if segment_ids is not None:
      vis &= seg == seg_i
    s = jnp.einsum("hd,thd->ht", qi.astype(jnp.float32) * scale, k)
    s = jnp.where(vis[None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("ht,thd->hd", p, v)

  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
  pos = jnp.broadcast_to(j, (B, T)) if positions is None else positions
  per_row = jax.vmap(one_query, in_axes=(0, 0, 0, 0, None, None, None, None))
  o = jax.vmap(lambda q, s, p, k, v: per_row(j, q, s, p, k, v, s, p))(q, seg, pos, k, v)
  return o.astype(v.dtype)
