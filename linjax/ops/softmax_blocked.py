"""Blocked causal softmax attention (the `chunk` method of `linjax.ops.attention`).

One implementation for every causal self-attention linjax runs in jnp: full causal (the
teacher), a sliding window (SWA, the windows of Liger and LoLCATs, LASP-2H's local part),
with attention sinks, GQA and packed rows. Flash-attention style, so time is O(T * keys seen)
and memory O(T * C) whatever the window:

  * tokens are cut into blocks of C; the keys a query block can see lie in its own block and
    the `nb` blocks before it (nb = ceil((W - 1) / C) for a window W, n - 1 for full causal);
  * a `lax.scan` over the block diagonals d = 0..nb pairs every query block i with key block
    i - d (all pairs of one diagonal in one batched matmul) and keeps the running max m, sum
    l and output of an online softmax;
  * attention sinks (the first `num_sinks` positions of each query's segment) are gathered
    per query and folded in as one more step;
  * the backward is a custom VJP that recomputes the scores diagonal by diagonal from the
    saved log-sum-exp (nothing of size T x keys is stored).

Visibility is decided by positions and segment ids exactly as `attention_mask` does; the
blocking only bounds which keys are looked at, and assumes that positions advance by one per
token inside a segment (true for the trainer's packed rows, padded eval batches and
left-padded prompts). Anything else (arbitrary positions, cross attention, cache lookups)
takes the `parallel` method.

`blocked_attention` returns (o, lse, m): the normalised output, the log-sum-exp of the visible
logits and their max (LoLCATs combines its window with a linear term through m). Rows that see
no key get o = 0 and lse = m = NEG (finite, so merging partial results stays NaN-free).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
NEG = -1e30


def _pad_blocks(x, C, fill=0):
  """[B, T, ...] -> [B, n, C, ...] (T padded to a multiple of C with `fill`)."""
  B, T = x.shape[:2]
  n = -(-T // C)
  pad = n * C - T
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
  return x.reshape((B, n, C) + x.shape[2:])


def _shift(x, d):
  """Block i gets block i - d (axis 1); blocks i < d get block n - d + i (masked by the caller)."""
  return jnp.roll(x, d, axis=1)


def _diag_mask(qpos, qseg, kpos, kseg, d, window, C):
  """Visibility [B, n, C_q, C_k] of key block i - d for query block i. window: None or
  (W, kind) with kind "sliding" | "blocks" (see `linjax.ops.softmax.in_window`)."""
  n = qpos.shape[1]
  valid = (jnp.arange(n) >= d)[None, :, None, None] & (kseg[:, :, None, :] >= 0)
  vis = valid & (kseg[:, :, None, :] == qseg[:, :, :, None])
  vis &= kpos[:, :, None, :] <= qpos[:, :, :, None]
  if window is not None:
    W, kind = window
    qp, kp = qpos[:, :, :, None], kpos[:, :, None, :]
    vis &= (qp - kp < W) if kind == "sliding" else (kp // W >= qp // W - 1)
  # index causality inside the diagonal block (a later token is never visible)
  tri = jnp.arange(C)[None, :] <= jnp.arange(C)[:, None]
  return vis & jnp.where(d == 0, tri, True)[None, None]


def _scores(qb, kd):
  # qb [B, n, C, Hkv, rep, D], kd [B, n, C, Hkv, D] -> [B, n, Hkv, rep, C_q, C_k]
  return jnp.einsum("bnihrd,bnjhd->bnhrij", qb, kd, preferred_element_type=F32)


def _sink_scores(qb, sk):
  # sk [B, n, C, S, Hkv, D] -> [B, n, Hkv, rep, C, S]
  return jnp.einsum("bnihrd,bnishd->bnhris", qb, sk, preferred_element_type=F32)


def _fwd(qb, kb, vb, qpos, qseg, sk, sv, svis, window, nb):
  """Online softmax over the sinks and diagonals 0..nb. Returns (o, lse, m) blockwise:
  o [B, n, C, Hkv, rep, Dv] f32; lse, m [B, n, Hkv, rep, C]."""
  B, n, C, Hkv, rep, _ = qb.shape
  Dv = vb.shape[-1]
  m = jnp.full((B, n, Hkv, rep, C), NEG, F32)
  l = jnp.zeros_like(m)
  acc = jnp.zeros((B, n, Hkv, rep, C, Dv), F32)

  def update(carry, s, vis, values, spec):
    m, l, acc = carry
    s = jnp.where(vis, s, NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = l * alpha + p.sum(-1)
    acc = acc * alpha[..., None] + jnp.einsum(spec, p, values.astype(F32))
    return m_new, l, acc

  carry = (m, l, acc)
  if sk is not None:
    vis = svis[:, :, None, None]                                 # [B, n, 1, 1, C, S]
    carry = update(carry, _sink_scores(qb, sk), vis, sv, "bnhris,bnishv->bnhriv")

  def body(carry, d):
    kd, vd = _shift(kb, d), _shift(vb, d)
    vis = _diag_mask(qpos, qseg, _shift(qpos, d), _shift(qseg, d), d, window, C)[:, :, None, None]
    return update(carry, _scores(qb, kd), vis, vd, "bnhrij,bnjhv->bnhriv"), None

  (m, l, acc), _ = lax.scan(body, carry, jnp.arange(nb + 1))
  seen = l > 0
  o = acc / jnp.where(seen, l, 1.0)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
  m = jnp.where(seen, m, NEG)
  return jnp.moveaxis(o, 4, 2), lse, m                           # o -> [B, n, C, Hkv, rep, Dv]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _flash(qb, kb, vb, qpos, qseg, sk, sv, svis, window, nb):
  return _fwd(qb, kb, vb, qpos, qseg, sk, sv, svis, window, nb)


def _flash_fwd(qb, kb, vb, qpos, qseg, sk, sv, svis, window, nb):
  o, lse, m = _fwd(qb, kb, vb, qpos, qseg, sk, sv, svis, window, nb)
  return (o, lse, m), (qb, kb, vb, qpos, qseg, sk, sv, svis, o, lse, m)


def _flash_bwd(window, nb, res, cts):
  qb, kb, vb, qpos, qseg, sk, sv, svis, o, lse, m = res
  do, dlse, dm = cts
  C = qb.shape[2]
  do = jnp.moveaxis(do.astype(F32), 2, 4)                       # [B, n, Hkv, rep, C, Dv]
  o_ = jnp.moveaxis(o, 2, 4)
  delta = (do * o_).sum(-1)                                      # [B, n, Hkv, rep, C]

  def grads(s, vis):
    """p and dS of one group of keys (ds includes the lse and max cotangents)."""
    s = jnp.where(vis, s, NEG)
    p = jnp.where(vis, jnp.exp(s - lse[..., None]), 0.0)
    is_max = vis & (s == m[..., None])
    return p, is_max

  def finish(p, is_max, dp):
    return p * (dp - delta[..., None] + dlse[..., None]) + jnp.where(is_max, dm[..., None], 0.0)

  dq = jnp.zeros(qb.shape, F32)
  dsk = dsv = None
  if sk is not None:
    vis = svis[:, :, None, None]
    p, is_max = grads(_sink_scores(qb, sk), vis)
    dp = jnp.einsum("bnhriv,bnishv->bnhris", do, sv.astype(F32))
    ds = finish(p, is_max, dp)
    dq += jnp.einsum("bnhris,bnishd->bnihrd", ds, sk.astype(F32))
    dsk = jnp.einsum("bnhris,bnihrd->bnishd", ds, qb.astype(F32)).astype(sk.dtype)
    dsv = jnp.einsum("bnhris,bnhriv->bnishv", p, do).astype(sv.dtype)

  def body(carry, d):
    dq, dk, dv = carry
    kd, vd = _shift(kb, d), _shift(vb, d)
    vis = _diag_mask(qpos, qseg, _shift(qpos, d), _shift(qseg, d), d, window, C)[:, :, None, None]
    p, is_max = grads(_scores(qb, kd), vis)
    dp = jnp.einsum("bnhriv,bnjhv->bnhrij", do, vd.astype(F32))
    ds = finish(p, is_max, dp)
    dq = dq + jnp.einsum("bnhrij,bnjhd->bnihrd", ds, kd.astype(F32))
    dk_d = jnp.einsum("bnhrij,bnihrd->bnjhd", ds, qb.astype(F32))
    dv_d = jnp.einsum("bnhrij,bnhriv->bnjhv", p, do)
    # the contributions of query block i belong to key block i - d
    return (dq, dk + _shift(dk_d, -d), dv + _shift(dv_d, -d)), None

  zeros = lambda x: jnp.zeros(x.shape, F32)
  (dq, dk, dv), _ = lax.scan(body, (dq, zeros(kb), zeros(vb)), jnp.arange(nb + 1))
  none = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
  return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), none(qpos),
          none(qseg), dsk, dsv, none(svis))


_flash.defvjp(_flash_fwd, _flash_bwd)


def segment_starts(segment_ids):
  """[B, T] index of the first token of each token's run of equal segment ids."""
  B, T = segment_ids.shape
  t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  new = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  return lax.cummax(jnp.where(new, t, 0), axis=1)


def blocked_attention(q, k, v, *, positions, segment_ids, window=None, num_sinks=0,
                      scale=None, block_size=64, window_kind="sliding"):
  """Causal self-attention over one token sequence (S == T), blocked.

  q [B, T, Hq, D]; k, v [B, T, Hkv, D(v)]; positions, segment_ids [B, T] int32 (a segment id
  < 0 marks an empty slot nobody sees). window None (full causal) or W >= 1 (window_kind
  "sliding", or "blocks": LoLCATs' block terrace, keys at most 2W - 1 back); num_sinks:
  positions < num_sinks of a query's own segment stay visible outside the window.
  Returns (o [B, T, Hq, Dv] f32, lse [B, T, Hq] f32, m [B, T, Hq] f32).
  """
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  rep = Hq // Hkv
  scale = D ** -0.5 if scale is None else scale
  C = int(min(block_size, max(T, 1)))
  n = -(-T // C)
  span = None if window is None else (int(window) if window_kind == "sliding" else 2 * int(window))
  nb = n - 1 if window is None else min(n - 1, -(-(span - 1) // C))
  qb = _pad_blocks((q * scale).astype(q.dtype).reshape(B, T, Hkv, rep, D), C)
  kb, vb = _pad_blocks(k, C), _pad_blocks(v, C)
  pos = _pad_blocks(positions.astype(jnp.int32), C)
  seg = _pad_blocks(segment_ids.astype(jnp.int32), C, fill=-1)
  sk = sv = svis = None
  if window is not None and num_sinks:
    # the first num_sinks tokens of each query's run; visible if they are sinks by position,
    # causal, and not already inside the query's window
    start = segment_starts(segment_ids)
    idx = start[:, :, None] + jnp.arange(num_sinks)[None, None, :]          # [B, T, S]
    ok = idx < T
    idx = jnp.minimum(idx, T - 1)
    flat = idx.reshape(B, -1)
    take = lambda x: jax.vmap(lambda a, i: a[i])(x, flat).reshape((B, T, num_sinks) + x.shape[2:])
    kpos, kseg = take(positions), take(segment_ids)
    qp, qs = positions[:, :, None], segment_ids[:, :, None]
    from linjax.ops.softmax import in_window
    svis = (ok & (kseg == qs) & (kseg >= 0) & (kpos < num_sinks) & (kpos <= qp)
            & ~in_window(qp, kpos, int(window), window_kind))
    sk, sv = _pad_blocks(take(k), C), _pad_blocks(take(v), C)
    svis = _pad_blocks(svis, C)
  win = None if window is None else (int(window), window_kind)
  o, lse, m = _flash(qb, kb, vb, pos, seg, sk, sv, svis, win, nb)
  o = o.reshape(B, n * C, Hq, -1)[:, :T]
  unblk = lambda x: jnp.moveaxis(x, 4, 2).reshape(B, n * C, Hq)[:, :T]
  return o, unblk(lse), unblk(m)
