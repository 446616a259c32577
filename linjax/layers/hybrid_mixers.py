"""Hybrid mixers: softmax over a short window plus linear attention (LoLCATs, Liger).

LoLCATs ("lolcats", variant "sw" or "tk"):
  phi = Hedgehog map per head (softmax over [x W, -x W], W = I at init), after rotary, one map
  for q and one for k (per query head; GQA keys are repeated first, as LoLCATs does).
  A key j is "window" for query i when i - j < window ("sw", a true sliding window) or when
  block(j) >= block(i) - 1 with block = pos // window ("tk", the block terrace); every other
  causal key is "linear". With s_ij = q_i k_j / sqrt(D) and m_i = max over window keys:
      y_i = (sum_win w_h exp(s_ij - m_i) v_j + sum_lin phi(q_i).phi(k_j) v_j)
            / (sum_win w_h exp(s_ij - m_i)   + sum_lin phi(q_i).phi(k_j))
  w_h = sigmoid(window_factors_h), learned per head, sigmoid(init) = 0.1.

Liger ("liger"): no new parameters. Gates pooled from the key projection (average pooling
  of k to Hkv * D values: the identity at that size), log-gate = logsigmoid(g) / 16, softmax
  feature map over the head dim (on q, k before rotary), GLA with scale 1 and no
  denominator; y = 0.5 * GLA + 0.5 * softmax attention over a 64-token window (rotary q, k).

Modes as in `linear_mixers`: "quadratic" (T x T masks; the attention-transfer form),
"chunk" (blocked window attention + the `gla` op), "recurrent" (the decode step scanned).
Decode state: the linear state (O(1)) plus a ring of the last `window` (sw) or
`2 * window` (tk) rotary keys and values with their positions. A LoLCATs key is folded into
the linear state the first time some query sees it as "linear"; ring slots are `pos % R`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from linjax.layers.feature_maps import FeatureMap, feature_dim, feature_map_fn
from linjax.layers.linear_mixers import (QKVO, DistillMixin, call_op, recurrent_scan,
                                         repeat_kv, rotary, segment_masks)
from linjax.layers.mixers import register_mixer
from linjax.layers.params import FeatureMapParam

NEG = -1e30


def in_window(qp, kp, window, variant):
  if variant == "sw":
    return qp - kp < window
  if variant == "tk":
    return kp // window >= qp // window - 1
  raise ValueError(f"variant must be 'sw' or 'tk', got {variant!r}")


def ring_size(window, variant):
  return window if variant == "sw" else 2 * window


# ----------------------------------------------------------------------------------------
# LoLCATs math, pure functions (checkpointed in attention transfer)
# ----------------------------------------------------------------------------------------

def lolcats_quadratic(q, k, fq, fk, v, wf, *, vis, win, scale):
  """q, k [B,T,H,D] (rotary, k per query head); fq, fk [B,T,H,F]; v [B,T,H,V]; wf [H] in (0,1).

  vis / win: [B, T, T] causal-visible / window masks. Returns (y [B,T,H,V], weights [B,H,T,T]).
  """
  f32 = jnp.float32
  win = (vis & win)[:, None]
  lin = vis[:, None] & ~win
  s = jnp.einsum("bihd,bjhd->bhij", q.astype(f32), k.astype(f32)) * scale
  s = jnp.where(win, s, NEG)
  # m is NOT a stop_gradient: the linear term is not scaled by exp(-m), so y depends on m
  # (LoLCATs' reference differentiates through its amax too). Detaching it gave wrong q / k
  # gradients, which drove LoRA fine-tunes to diverge after ~100-200 steps.
  m = s.max(-1, keepdims=True)
  a_sm = jnp.where(win, jnp.exp(s - m), 0.0) * wf[None, :, None, None]
  a_ln = jnp.where(lin, jnp.einsum("bihf,bjhf->bhij", fq.astype(f32), fk.astype(f32)), 0.0)
  a = a_sm + a_ln
  den = a.sum(-1, keepdims=True)
  w = a / jnp.where(den > 0, den, 1.0)
  return jnp.einsum("bhij,bjhv->bihv", w, v.astype(f32)), w


# ----------------------------------------------------------------------------------------
# LoLCATs
# ----------------------------------------------------------------------------------------

@register_mixer("lolcats")
class LolcatsAttention(DistillMixin, QKVO):
  """LoLCATs hybrid: window softmax + Hedgehog linear attention, one shared denominator."""

  def __init__(self, config, layer_idx, *, rngs, window=64, variant="sw",
               feature_map="hedgehog", init_window_factor=0.1, mode="chunk"):
    super().__init__(config, layer_idx, rngs=rngs, mode=mode)
    if variant not in ("sw", "tk"):
      raise ValueError(f"variant must be 'sw' or 'tk', got {variant!r}")
    self.window, self.variant = int(window), variant
    self.feature_map_q = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feature_map_k = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feat_dim = feature_dim(feature_map, self.head_dim)
    logit = math.log(init_window_factor) - math.log1p(-init_window_factor)
    self.window_factors = FeatureMapParam(jnp.full((self.num_heads,), logit, jnp.float32))

  # --- pieces ---------------------------------------------------------------------------
  def student_params(self):
    fm = lambda m: (None if m.weight is None else m.weight[...],
                    None if m.bias is None else m.bias[...])
    return (fm(self.feature_map_q), fm(self.feature_map_k), self.window_factors[...])

  def _phi(self, params, q, k):
    (wq, bq), (wk, bk), _ = params
    return (feature_map_fn(self.feature_map_q.kind, q, wq, bq),
            feature_map_fn(self.feature_map_k.kind, k, wk, bk))

  def student_quadratic(self, params, q, k, v, positions, vis):
    fq, fk = self._phi(params, q, k)
    win = in_window(positions[:, :, None], positions[:, None, :], self.window, self.variant)
    return lolcats_quadratic(q, k, fq, fk, v, jax.nn.sigmoid(params[2]), vis=vis, win=win,
                             scale=self.head_dim ** -0.5)

  def _qkv(self, x, positions):
    q, k, v = self.project(x)
    return rotary(q, positions, self.config), rotary(k, positions, self.config), v

  # --- full-sequence forms ----------------------------------------------------------------
  def _chunk(self, params, q, k, v, seg=None):
    """Blocked window attention + linear part. The window is by token index, which is the
    position distance inside a segment (packed rows restart positions per document); with
    `seg` ("sw" only) both parts see only their own segment."""
    B, T, H, D = q.shape
    W = self.window
    f32 = jnp.float32
    fq, fk = self._phi(params, q, k)
    wf = jax.nn.sigmoid(params[2])
    nb = -(-T // W)
    pad = nb * W - T
    padt = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    qb = padt(q).reshape(B, nb, W, H, D).astype(f32)
    kb = padt(k).reshape(B, nb, W, H, D).astype(f32)
    vb = padt(v).reshape(B, nb, W, H, -1).astype(f32)
    prev = lambda a: jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, :-1]], 1)
    k2 = jnp.concatenate([prev(kb), kb], 2)   # [B, nb, 2W, H, D]
    v2 = jnp.concatenate([prev(vb), vb], 2)
    i = jnp.arange(nb)[:, None] * W + jnp.arange(W)[None, :]            # [nb, W]
    j = (jnp.arange(nb)[:, None] - 1) * W + jnp.arange(2 * W)[None, :]  # [nb, 2W]
    ok = (j[:, None, :] >= 0) & (j[:, None, :] <= i[:, :, None]) & (j[:, None, :] < T)
    ok &= in_window(i[:, :, None], j[:, None, :], W, self.variant)      # [nb, W, 2W]
    ok = ok[None]
    if seg is not None:
      sb = padt(seg).reshape(B, nb, W)
      ok = ok & (sb[..., :, None] == jnp.concatenate([prev(sb), sb], 2)[..., None, :])
    ok = ok[:, :, None]                                                # [B|1, nb, 1, W, 2W]
    s = jnp.einsum("bnihd,bnjhd->bnhij", qb, k2) * self.head_dim ** -0.5
    s = jnp.where(ok, s, NEG)
    m = s.max(-1, keepdims=True)  # differentiated: see lolcats_quadratic
    a = jnp.where(ok, jnp.exp(s - m), 0.0) * wf[None, None, :, None, None]
    num_sm = jnp.einsum("bnhij,bnjhv->bnihv", a, v2).reshape(B, nb * W, H, -1)[:, :T]
    den_sm = a.sum(-1).transpose(0, 1, 3, 2).reshape(B, nb * W, H)[:, :T]
    vaug = jnp.concatenate([v.astype(f32), jnp.ones(v.shape[:3] + (1,), f32)], -1)
    if self.variant == "sw":
      if T > W:
        fq_shift = jnp.concatenate([fq[:, W:], jnp.zeros_like(fq[:, :W])], 1)
        if seg is not None:  # query t + W reads the state after key t of its own segment
          same = jnp.concatenate([seg[:, W:] == seg[:, :-W], jnp.zeros_like(seg[:, :W], bool)], 1)
          fq_shift = jnp.where(same[:, :, None, None], fq_shift, 0.0)
        o, _ = call_op("gla", fq_shift, fk, vaug, None, scale=1.0, segment_ids=seg)
        lin = jnp.concatenate([jnp.zeros_like(o[:, :W]), o[:, : T - W]], 1).astype(f32)
      else:
        lin = jnp.zeros(v.shape[:3] + (v.shape[-1] + 1,), f32)
    else:
      fkb = padt(fk).reshape(B, nb, W, H, -1).astype(f32)
      kv = jnp.einsum("bnjhf,bnjhv->bnhfv", fkb, padt(vaug).reshape(B, nb, W, H, -1))
      cum = jnp.cumsum(kv, 1)
      st = jnp.concatenate([jnp.zeros_like(cum[:, :2]), cum[:, :-2]], 1)[:, :nb]  # block <= b-2
      fqb = padt(fq).reshape(B, nb, W, H, -1).astype(f32)
      lin = jnp.einsum("bnihf,bnhfv->bnihv", fqb, st).reshape(B, nb * W, H, -1)[:, :T]
    num = num_sm + lin[..., :-1]
    den = den_sm + lin[..., -1]
    return num / jnp.where(den > 0, den, 1.0)[..., None]

  # --- decode ---------------------------------------------------------------------------
  def init_cache(self, batch_size, max_len=None, dtype=jnp.float32):
    R = ring_size(self.window, self.variant)
    B, H, Hkv, D = batch_size, self.num_heads, self.num_kv_heads, self.head_dim
    return {"state": jnp.zeros((B, H, self.feat_dim, D + 1), jnp.float32),
            "k": jnp.zeros((B, R, Hkv, D), jnp.float32),
            "v": jnp.zeros((B, R, Hkv, D), jnp.float32),
            "pos": jnp.full((B, R), -1, jnp.int32),
            "folded": jnp.zeros((B, R), bool)}

  def _cached(self, params, q, k, v, positions, upd, cache):
    rep = self.num_heads // self.num_kv_heads
    (wq, bq), (wk, bk), wfl = params
    wf = jax.nn.sigmoid(wfl)
    kind_q, kind_k = self.feature_map_q.kind, self.feature_map_k.kind
    W, variant, R = self.window, self.variant, ring_size(self.window, self.variant)
    scale = self.head_dim ** -0.5
    f32 = jnp.float32

    def step(c, xs):
      qt, kt, vt, pt, ut = xs   # [B,H,D], [B,Hkv,D], [B,Hkv,D], [B], [B]
      valid = c["pos"] >= 0
      lin = valid & ~c["folded"] & ~in_window(pt[:, None], c["pos"], W, variant) \
          & (c["pos"] <= pt[:, None]) & ut[:, None]
      fk_r = feature_map_fn(kind_k, repeat_kv(c["k"], rep), wk, bk)          # [B,R,H,F]
      v_r = repeat_kv(c["v"], rep)
      v_aug = jnp.concatenate([v_r, jnp.ones(v_r.shape[:3] + (1,), f32)], -1)
      fk_r = jnp.where(lin[:, :, None, None], fk_r, 0.0)
      state = c["state"] + jnp.einsum("brhf,brhv->bhfv", fk_r, v_aug)
      folded = c["folded"] | lin
      slot = jax.nn.one_hot(pt % R, R, dtype=bool) & ut[:, None]              # [B, R]
      nk = jnp.where(slot[:, :, None, None], kt[:, None].astype(f32), c["k"])
      nv = jnp.where(slot[:, :, None, None], vt[:, None].astype(f32), c["v"])
      npos = jnp.where(slot, pt[:, None], c["pos"])
      folded = jnp.where(slot, False, folded)
      state = jnp.where(ut[:, None, None, None], state, c["state"])
      c = {"state": state, "k": nk, "v": nv, "pos": npos, "folded": folded}
      # outputs
      win = (npos >= 0) & ~folded & (npos <= pt[:, None]) \
          & in_window(pt[:, None], npos, W, variant)                            # [B, R]
      s = jnp.einsum("bhd,brhd->bhr", qt.astype(f32), repeat_kv(nk, rep)) * scale
      s = jnp.where(win[:, None], s, NEG)
      m = s.max(-1, keepdims=True)
      a = jnp.where(win[:, None], jnp.exp(s - m), 0.0) * wf[None, :, None]
      num = jnp.einsum("bhr,brhv->bhv", a, repeat_kv(nv, rep))
      den = a.sum(-1)
      fqt = feature_map_fn(kind_q, qt, wq, bq)
      o_lin = jnp.einsum("bhf,bhfv->bhv", fqt, state)
      num, den = num + o_lin[..., :-1], den + o_lin[..., -1]
      return c, num / jnp.where(den > 0, den, 1.0)[..., None]

    sw = lambda a: jnp.swapaxes(a, 0, 1)
    cache, o = jax.lax.scan(step, cache, (sw(q), sw(k), sw(v), sw(positions), sw(upd)))
    return sw(o), cache

  # --- entry points -----------------------------------------------------------------------
  def heads(self, x, *, positions, segment_ids=None, cache=None):
    q, k, v = self._qkv(x, positions)
    params = self.student_params()
    if cache is not None:
      upd = jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids > 0
      return self._cached(params, q, k, v, positions, upd, cache)
    rep = self.num_heads // self.num_kv_heads
    kr, vr = repeat_kv(k, rep), repeat_kv(v, rep)
    if self.mode == "chunk" and (segment_ids is None or self.variant == "sw"):
      return self._chunk(params, q, kr, vr, segment_ids), None
    if self.mode == "recurrent":
      # per-token decode step over fresh caches, one per segment run
      B = x.shape[0]
      if segment_ids is not None:
        raise NotImplementedError("recurrent full pass with segment_ids: use mode='quadratic'")
      upd = jnp.ones(x.shape[:2], bool)
      o, _ = self._cached(params, q, k, v, positions, upd, self.init_cache(B))
      return o, None
    vis = segment_masks(positions, segment_ids)
    o, _ = self.student_quadratic(params, q, kr, vr, positions, vis)
    return o, None

  def __call__(self, x, *, positions, segment_ids=None, cache=None):
    if self.distill and cache is None:
      return self._distill_call(x, positions, segment_ids), None
    o, cache = self.heads(x, positions=positions, segment_ids=segment_ids, cache=cache)
    return self.out(o, x), cache


# ----------------------------------------------------------------------------------------
# Liger
# ----------------------------------------------------------------------------------------

@register_mixer("liger")
class LigerAttention(QKVO):
  """Liger attention: 0.5 * GLA(softmax q, softmax k, gates from k) + 0.5 * window softmax."""

  def __init__(self, config, layer_idx, *, rngs, window=64, gate_logit_normalizer=16.0,
               mix=0.5, mode="chunk"):
    super().__init__(config, layer_idx, rngs=rngs, mode=mode)
    self.window = int(window)
    self.gate_logit_normalizer = float(gate_logit_normalizer)
    self.mix = float(mix)

  def _features(self, x, positions):
    q, k, v = self.project(x)
    rep = self.num_heads // self.num_kv_heads
    B, T = x.shape[:2]
    # AdaptiveAvgPool1d of k ([B, T, Hkv*D]) to Hkv*D outputs is the identity.
    g = jax.nn.log_sigmoid(k.astype(jnp.float32)) / self.gate_logit_normalizer
    fq = jax.nn.softmax(q.astype(jnp.float32), -1)
    fk = jax.nn.softmax(k.astype(jnp.float32), -1)
    qr, kr = rotary(q, positions, self.config), rotary(k, positions, self.config)
    return (fq, repeat_kv(fk, rep), repeat_kv(v, rep).astype(jnp.float32),
            repeat_kv(g, rep), qr, kr, v)

  def init_cache(self, batch_size, max_len=None, dtype=jnp.float32):
    B, H, Hkv, D, W = batch_size, self.num_heads, self.num_kv_heads, self.head_dim, self.window
    return {"state": jnp.zeros((B, H, D, D), jnp.float32),
            "k": jnp.zeros((B, W, Hkv, D), jnp.float32),
            "v": jnp.zeros((B, W, Hkv, D), jnp.float32),
            "pos": jnp.full((B, W), -1, jnp.int32)}

  def heads(self, x, *, positions, segment_ids=None, cache=None):
    fq, fk, vr, g, qr, kr, v = self._features(x, positions)
    B, T = x.shape[:2]
    W, rep = self.window, self.num_heads // self.num_kv_heads
    if cache is None:
      if self.mode == "recurrent":
        reset = None
        if segment_ids is not None:
          reset = jnp.concatenate([jnp.zeros((B, 1), bool),
                                   segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
        o_lin, _ = recurrent_scan(fq, fk, vr, g, None, scale=1.0, reset=reset)
      else:
        o_lin, _ = call_op("gla", fq, fk, vr, g, scale=1.0, segment_ids=segment_ids)
      o_sw = call_op("attention", qr, kr, v, causal=True, window=W, segment_ids=segment_ids,
                     q_positions=positions, kv_positions=positions)
      return self.mix * o_sw.astype(jnp.float32) + (1 - self.mix) * o_lin.astype(jnp.float32), None

    upd = jnp.ones((B, T), bool) if segment_ids is None else segment_ids > 0
    fk = jnp.where(upd[:, :, None, None], fk, 0.0)
    g = jnp.where(upd[:, :, None, None], g, 0.0)
    o_lin, state = recurrent_scan(fq, fk, vr, g, None, scale=1.0, initial_state=cache["state"],
                                  update=upd)
    scale = self.head_dim ** -0.5

    def step(c, xs):
      qt, kt, vt, pt, ut = xs
      slot = jax.nn.one_hot(pt % W, W, dtype=bool) & ut[:, None]
      nk = jnp.where(slot[:, :, None, None], kt[:, None].astype(jnp.float32), c["k"])
      nv = jnp.where(slot[:, :, None, None], vt[:, None].astype(jnp.float32), c["v"])
      npos = jnp.where(slot, pt[:, None], c["pos"])
      win = (npos >= 0) & (npos <= pt[:, None]) & (pt[:, None] - npos < W)
      s = jnp.einsum("bhd,brhd->bhr", qt.astype(jnp.float32), repeat_kv(nk, rep)) * scale
      s = jnp.where(win[:, None], s, NEG)
      p = jnp.where(win[:, None], jax.nn.softmax(s, -1), 0.0)
      return {"k": nk, "v": nv, "pos": npos}, jnp.einsum("bhr,brhv->bhv", p, repeat_kv(nv, rep))

    sw = lambda a: jnp.swapaxes(a, 0, 1)
    ring = {"k": cache["k"], "v": cache["v"], "pos": cache["pos"]}
    ring, o_sw = jax.lax.scan(step, ring, (sw(qr), sw(kr), sw(v), sw(positions), sw(upd)))
    o = self.mix * sw(o_sw) + (1 - self.mix) * o_lin
    return o, {"state": state, **ring}

  def __call__(self, x, *, positions, segment_ids=None, cache=None):
    o, cache = self.heads(x, positions=positions, segment_ids=segment_ids, cache=cache)
    return self.out(o, x), cache
