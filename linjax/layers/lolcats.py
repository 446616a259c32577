"""LoLCATs (Zhang et al. 2024): softmax over a short window + Hedgehog linear attention, one
shared denominator. Registered: "lolcats".

  phi = the Hedgehog map per head (`linjax.ops.feature_maps.hedgehog`, W = I at init), after
  rotary, one map for q and one for k (per query head; GQA keys are repeated first). A key j
  is "window" for query i when p_i - p_j < W ("sw", a true sliding window) or
  p_j // W >= p_i // W - 1 ("tk", the block terrace), or when it is one of the first
  `num_sinks` positions (attention sinks, a linjax option; 0 in the paper); every other
  causal key is "linear". With s_ij = q_i k_j / sqrt(D) and m_i = max over window keys:
      y_i = (sum_win w_h exp(s_ij - m_i) v_j + sum_lin phi(q_i).phi(k_j) v_j)
            / (sum_win w_h exp(s_ij - m_i)   + sum_lin phi(q_i).phi(k_j))
  w_h = sigmoid(window_factors_h), learned per head, sigmoid(init) = 0.1. m_i is LoLCATs' own
  choice (its code subtracts the window max and does not rescale the linear term), so y
  depends on m and m is differentiated.

  `init_linear_factor` (a linjax option; None in the paper): both linear sums are multiplied
  by a learned per-head factor l_h = max(linear_factors_h, 0) starting at that value; 0 makes
  the layer exactly softmax attention over the window (and sinks) at step 0, so training
  starts from the sliding-window baseline and can only add the linear part from there.

Methods: "parallel" is the T x T form above (also the attention-transfer form); every other
method runs the window part through `linjax.ops.attention` (blocked, O(T W); with its max and
log-sum-exp) and the linear part through the `gla` op with the mixer's method: for "sw" the
query at i reads the state after key i - W (one op call over keys shifted by W), for "tk" the
state at the start of the block before its own. "recurrent" scans the decode step, one token
at a time, in training and in the prefill alike (the slow reference path).

Decode state: the linear state [B, H, F, D + 1] (the last column is the denominator), a cache
of `num_sinks` + R rotary keys / values (R = W for "sw", 2W for "tk"; slots as in
`linjax.layers.base.cache_slots`) and, for "tk", `lin_end` [B]: keys at positions below it
are folded into the state. A T-token prompt is one pass of the same forms over (cache, new
tokens); one token is the T = 1 case.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from linjax.layers.base import (NEG, QKVO, cached_attention, check_method, init_kv_cache,
                                repeat_kv, token_mask, write_kv_cache)
from linjax.layers.distill import DistillMixin
from linjax.layers.feature_maps import FeatureMap, feature_dim
from linjax.layers.mixers import register_mixer
from linjax.layers.params import FeatureMapParam
from linjax.ops.softmax import in_window
from linjax.parallel import sequence as sp

VARIANTS = {"sw": "sliding", "tk": "blocks"}
F32 = jnp.float32


def lolcats_quadratic(q, k, fq, fk, v, wf, *, vis, win, scale, lf=None):
  """q, k [B,T,H,D] (rotary, k per query head); fq, fk [B,T,H,F]; v [B,T,H,V]; wf [H] in (0,1);
  lf [H] >= 0 or None (the linear factor).

  vis / win: [B, T, T] causal-visible / window (sinks included) masks.
  Returns (y [B,T,H,V], weights [B,H,T,T])."""
  win = (vis & win)[:, None]
  lin = vis[:, None] & ~win
  s = jnp.einsum("bihd,bjhd->bhij", q.astype(F32), k.astype(F32)) * scale
  s = jnp.where(win, s, NEG)
  m = s.max(-1, keepdims=True)   # differentiated: see the module docstring
  a_sm = jnp.where(win, jnp.exp(s - m), 0.0) * wf[None, :, None, None]
  a_ln = jnp.where(lin, jnp.einsum("bihf,bjhf->bhij", fq.astype(F32), fk.astype(F32)), 0.0)
  if lf is not None:
    a_ln = a_ln * lf[None, :, None, None]
  a = a_sm + a_ln
  den = a.sum(-1, keepdims=True)
  w = a / jnp.where(den > 0, den, 1.0)
  return jnp.einsum("bhij,bjhv->bihv", w, v.astype(F32)), w


def combine(o_w, lse_w, m_w, lin, wf, lf=None):
  """y from the window attention stats (o, lse, m [B,T,H]) and the linear part
  lin [B, T, H, V + 1] (numerator | denominator), lf [H] the linear factor or None."""
  if lf is not None:
    lin = lin * lf[None, None, :, None]
  e = jnp.exp(lse_w - m_w) * wf[None, None, :]          # = w_h sum_win exp(s - m)
  num = o_w.astype(F32) * e[..., None] + lin[..., :-1]
  den = e + lin[..., -1]
  return num / jnp.where(den > 0, den, 1.0)[..., None]


def _aligned(x, u, size):
  """Scatter x [B, T, ...] to index u [B, T] (u >= size: dropped) of a [B, size, ...] array."""
  z = jnp.zeros((x.shape[0], size) + x.shape[2:], x.dtype)
  return jax.vmap(lambda z, i, a: z.at[i].set(a, mode="drop"))(z, u, x)


@register_mixer("lolcats")
class LolcatsAttention(DistillMixin, QKVO):

  def __init__(self, config, layer_idx, *, rngs, window=64, variant="sw",
               feature_map="hedgehog", init_window_factor=0.1, num_sinks=0,
               init_linear_factor=None, method="auto"):
    super().__init__(config, rngs=rngs, method=method)
    if variant not in VARIANTS:
      raise ValueError(f"LoLCATs `variant` must be 'sw' or 'tk', got {variant!r}")
    if int(window) < 1:
      raise ValueError(f"LoLCATs `window` must be >= 1, got {window}")
    if int(num_sinks) < 0:
      raise ValueError(f"LoLCATs `num_sinks` must be >= 0, got {num_sinks}")
    if not 0.0 < float(init_window_factor) < 1.0:
      raise ValueError(f"`init_window_factor` must be in (0, 1), got {init_window_factor}")
    self.window, self.variant, self.num_sinks = int(window), variant, int(num_sinks)
    self.window_kind = VARIANTS[variant]
    self.ring = self.window if variant == "sw" else 2 * self.window
    self.feature_map_q = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feature_map_k = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feat_dim = feature_dim(feature_map, self.head_dim)
    logit = math.log(init_window_factor) - math.log1p(-init_window_factor)
    self.window_factors = FeatureMapParam(jnp.full((self.num_heads,), logit, F32))
    if init_linear_factor is not None and float(init_linear_factor) < 0:
      raise ValueError(f"`init_linear_factor` must be None or >= 0, got {init_linear_factor}")
    self.linear_factors = None if init_linear_factor is None else FeatureMapParam(
        jnp.full((self.num_heads,), float(init_linear_factor), F32))

  # --- pieces ---------------------------------------------------------------------------
  def student_params(self):
    lf = None if self.linear_factors is None else self.linear_factors[...]
    return (self.feature_map_q.params(), self.feature_map_k.params(), self.window_factors[...], lf)

  @staticmethod
  def _lf(params):
    return None if params[3] is None else jnp.maximum(params[3], 0.0)   # l_h >= 0

  def _phi(self, params, q, k):
    return self.feature_map_q.apply_with(params[0], q), self.feature_map_k.apply_with(params[1], k)

  def _win_mask(self, positions):
    qp, kp = positions[:, :, None], positions[:, None, :]
    return in_window(qp, kp, self.window, self.window_kind) | (kp < self.num_sinks)

  def student_quadratic(self, params, q, k, v, positions, vis):
    fq, fk = self._phi(params, q, k)
    return lolcats_quadratic(q, k, fq, fk, v, jax.nn.sigmoid(params[2]), vis=vis,
                             win=self._win_mask(positions), scale=self.head_dim ** -0.5,
                             lf=self._lf(params))

  def _window_method(self):
    # LoLCATs needs the window max m, which only the jnp forms return
    return "parallel" if self.method in ("parallel", "recurrent") else "chunk"

  def _lin_method(self):
    return "chunk" if self.method == "recurrent" else self.method

  def _vaug(self, v):
    v = repeat_kv(v, self.rep).astype(F32)
    return jnp.concatenate([v, jnp.ones(v.shape[:3] + (1,), F32)], -1)

  def bound(self, p):
    """Keys at positions < bound(p) (and >= num_sinks) are linear for a query at p."""
    return p - self.window + 1 if self.variant == "sw" else (p // self.window - 1) * self.window

  # --- the linear part ------------------------------------------------------------------
  def _lin_sw(self, fq, fk, vaug, seg, prefix=None, state=None):
    """Query i reads the state after the key W places before it, one gla call over the keys
    shifted by W: `prefix` (the cache's last W keys, oldest first, invalid ones zeroed) or W
    empty slots. Returns (lin [B, T, H, V+1], final state or None)."""
    B, T, H, F = fq.shape
    W = self.window
    if prefix is None:
      pk = jnp.zeros((B, W, H, F), F32)
      pv = jnp.zeros((B, W, H, vaug.shape[-1]), F32)
      pseg = None if seg is None else jnp.full((B, W), -1, jnp.int32)
    else:
      pk, pv = prefix
      pseg = None
    kc = jnp.concatenate([pk, fk], 1)[:, :T]
    vc = jnp.concatenate([pv, vaug], 1)[:, :T]
    segc = None
    if seg is not None and pseg is not None:   # packed rows: the state follows the key's segment
      segc = jnp.concatenate([pseg, seg], 1)[:, :T]
      fq = jnp.where((segc == seg)[:, :, None, None], fq, 0.0)
    o, S = sp.gla(fq, kc, vc, None, scale=1.0, segment_ids=segc, initial_state=state,
                  output_final_state=state is not None, method=self._lin_method())
    return o.astype(F32), S

  def _lin_tk(self, fq, fk, vaug, positions, upd):
    """Blocks of W positions: a query in block b sees the keys of blocks < b - 1. The tokens
    are placed at their position's offset from the row's first block, so the blocks line up
    for every row. Returns (lin [B, T, H, V+1], per-block exclusive sums [B, n + 1, H, F, V+1],
    the row's base position)."""
    B, T, H, F = fq.shape
    W = self.window
    first = jnp.min(jnp.where(upd, positions, jnp.iinfo(jnp.int32).max), axis=1)
    first = jnp.where(first == jnp.iinfo(jnp.int32).max, 0, first)
    base = (first // W) * W                                            # [B]
    n = -(-(T + W) // W)
    u = jnp.where(upd, positions - base[:, None], n * W)               # padding -> dropped
    fka = _aligned(jnp.where(upd[:, :, None, None], fk, 0.0), u, n * W).reshape(B, n, W, H, F)
    va = _aligned(vaug, u, n * W).reshape(B, n, W, H, -1)
    fqa = _aligned(fq, u, n * W).reshape(B, n, W, H, F)
    kv = jnp.einsum("bnjhf,bnjhv->bnhfv", fka, va)
    cum = jnp.concatenate([jnp.zeros_like(kv[:, :1]), jnp.cumsum(kv, 1)], 1)  # sum of blocks < b
    st = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-2]], 1)        # blocks < b - 1
    lin_a = jnp.einsum("bnihf,bnhfv->bnihv", fqa, st).reshape(B, n * W, H, -1)
    lin = jnp.take_along_axis(lin_a, jnp.minimum(u, n * W - 1)[:, :, None, None], axis=1)
    return lin, cum, base

  # --- full-sequence forms ----------------------------------------------------------------
  def _full(self, params, q, k, v, positions, seg):
    fq, fk = self._phi(params, q, repeat_kv(k, self.rep))
    wf = jax.nn.sigmoid(params[2])
    o_w, lse, m = sp.attention(q, k, v, window=self.window, window_kind=self.window_kind,
                               num_sinks=self.num_sinks, segment_ids=seg, q_positions=positions,
                               kv_positions=positions, method=self._window_method(),
                               return_stats=True)
    fk = jnp.where((positions >= self.num_sinks)[:, :, None, None], fk, 0.0)   # sinks: softmax
    vaug = self._vaug(v)
    if self.variant == "sw":
      lin, _ = self._lin_sw(fq, fk, vaug, seg)
    else:
      lin, _, _ = self._lin_tk(fq, fk, vaug, positions, jnp.ones(positions.shape, bool))
    return combine(o_w, lse, m, lin, wf, self._lf(params))

  # --- decode / prefill -------------------------------------------------------------------
  def init_cache(self, batch_size, max_len=None, dtype=F32):
    c = init_kv_cache(batch_size, self.num_sinks + self.ring, self.num_kv_heads, self.head_dim)
    c["state"] = jnp.zeros((batch_size, self.num_heads, self.feat_dim, self.head_dim + 1), F32)
    if self.variant == "tk":
      c["lin_end"] = jnp.zeros((batch_size,), jnp.int32)
    return c

  def _scan_cached(self, params, q, k, v, positions, upd, cache):
    """method="recurrent": the decode step once per token (a `lax.scan` over T), from `cache`;
    returns (o [B, T, H, D], the cache after the last token)."""
    def step(c, xs):
      qt, kt, vt, pt, ut = (a[:, None] for a in xs)
      o, c = self._cached(params, qt, kt, vt, pt, ut, c)
      return c, o[:, 0]
    sw = lambda a: jnp.swapaxes(a, 0, 1)
    cache, o = jax.lax.scan(step, cache, tuple(map(sw, (q, k, v, positions, upd))))
    return sw(o), cache

  def _cached(self, params, q, k, v, positions, upd, cache):
    S0 = self.num_sinks
    seg = upd.astype(jnp.int32)
    wf = jax.nn.sigmoid(params[2])
    o_w, lse, m = cached_attention(q, k, v, cache, positions=positions, segment_ids=seg,
                                   window=self.window, num_sinks=S0,
                                   method=self._window_method(), window_kind=self.window_kind)
    fq, fk = self._phi(params, q, repeat_kv(k, self.rep))
    lin_new = upd & (positions >= S0)
    fk = jnp.where(lin_new[:, :, None, None], fk, 0.0)
    vaug = self._vaug(v)
    ring = {n: cache[n][:, S0:] for n in ("k", "v", "pos", "seg")}
    rfk = self.feature_map_k.apply_with(params[1], repeat_kv(ring["k"], self.rep))
    rv = self._vaug(ring["v"])
    valid = ring["seg"] >= 0
    last = jnp.max(jnp.where(upd, positions, -1), axis=1)             # newest real position
    new_cache = write_kv_cache({n: cache[n] for n in ("k", "v", "pos", "seg")}, k, v, positions,
                               seg, window=self.ring, num_sinks=S0)
    if self.variant == "sw":
      # the cache's last W ring keys, oldest first (empty slots first, zeroed)
      order = jnp.argsort(jnp.where(valid, ring["pos"], -1), axis=1)
      take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
      pk = jnp.where(take(valid)[:, :, None, None], take(rfk), 0.0)
      lin, S = self._lin_sw(fq, fk, vaug, None, prefix=(pk, take(rv)), state=cache["state"])
      new_cache["state"] = S.astype(F32)
    else:
      # ring keys not folded yet, linear for a query at p when below bound(p)
      lin_end = cache["lin_end"]
      live = valid & (ring["pos"] >= lin_end[:, None]) & (ring["pos"] >= S0)
      bq = self.bound(positions)                                        # [B, T]
      a = jnp.einsum("bthf,brhf->bthr", fq, rfk)
      a = jnp.where((live[:, None, :] & (ring["pos"][:, None, :] < bq[:, :, None]))[:, :, None],
                    a, 0.0)
      lin_ring = jnp.einsum("bthr,brhv->bthv", a, rv)
      lin_st = jnp.einsum("bthf,bhfv->bthv", fq, cache["state"])
      lin_blk, cum, base = self._lin_tk(fq, fk, vaug, positions, upd)
      lin = lin_st + lin_ring + lin_blk
      # fold everything below bound(newest position) into the state
      end = jnp.where(last >= 0, jnp.maximum(self.bound(last), lin_end), lin_end)
      fold = live & (ring["pos"] < end[:, None])
      S = cache["state"] + jnp.einsum("brhf,brhv->bhfv", jnp.where(fold[:, :, None, None], rfk, 0.0), rv)
      nblk = jnp.clip((end - base) // self.window, 0, cum.shape[1] - 1)
      S = S + jnp.take_along_axis(cum, nblk[:, None, None, None, None], 1)[:, 0]
      new_cache["state"], new_cache["lin_end"] = S, end
    return combine(o_w, lse, m, lin, wf, self._lf(params)), new_cache

  # --- entry points -----------------------------------------------------------------------
  def heads(self, x, *, positions, segment_ids=None, cache=None):
    q, k, v = self.project(x)
    q, k = self.rotate(q, positions), self.rotate(k, positions)
    params = self.student_params()
    if cache is not None:
      upd = token_mask(x, segment_ids)
      if self.method == "recurrent" and x.shape[1] > 1:
        return self._scan_cached(params, q, k, v, positions, upd, cache)
      return self._cached(params, q, k, v, positions, upd, cache)
    if self.method == "parallel" or (self.variant == "tk" and segment_ids is not None):
      # the T x T form (tk over packed rows: blocks restart per document, no aligned layout)
      from linjax.layers.base import segment_masks
      o, _ = self.student_quadratic(params, q, repeat_kv(k, self.rep), repeat_kv(v, self.rep),
                                    positions, segment_masks(positions, segment_ids))
      return o, None
    if self.method == "recurrent":
      if segment_ids is not None:
        raise NotImplementedError("LoLCATs method='recurrent' over packed rows: use 'chunk'")
      o, _ = self._scan_cached(params, q, k, v, positions, jnp.ones(positions.shape, bool),
                               self.init_cache(x.shape[0]))
      return o, None
    return self._full(params, q, k, v, positions, segment_ids), None

