"""The hybrid mixers in plain torch: LoLCATs (window softmax + Hedgehog linear attention, one
shared denominator) and Liger (window softmax mixed with GLA). Their decode state is the
linear state plus a ring of recent keys (`linjax_window`) whose first `num_sinks` slots hold
the attention sinks: keys at positions < num_sinks, visible to the window softmax of every
later query and never part of the linear state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import linjax_ops as ops
from .linjax_ops import F32
from .linjax_mixers import FeatureMap, Mixer
from .linjax_window import (_where, blocked_window, contiguous, empty_ring, last_position,
                            ring_write)


class Lolcats(Mixer):
  """LoLCATs: softmax over a window plus Hedgehog linear attention, one shared denominator:

      y_i = (sum_win w_h exp(s_ij - m_i) v_j + sum_lin phi(q_i).phi(k_j) v_j)
            / (sum_win w_h exp(s_ij - m_i)   + sum_lin phi(q_i).phi(k_j)),   w_h = sigmoid(window_factors_h)

  key j is in the window of query i when i - j < window ("sw") or block(j) >= block(i) - 1
  with block = pos // window ("tk"), or when j < num_sinks (attention sinks); every other
  earlier key is linear. With `init_linear_factor` set, both linear sums are multiplied by
  l_h = max(linear_factors_h, 0).
  """

  def __init__(self, config, layer_idx, window=64, variant="sw", feature_map="hedgehog",
               init_window_factor=0.1, num_sinks=0, init_linear_factor=None):
    super().__init__(config, layer_idx)
    if variant not in ("sw", "tk"):
      raise ValueError(f"variant must be 'sw' or 'tk', got {variant!r}")
    if int(num_sinks) < 0:
      raise ValueError(f"num_sinks must be >= 0, got {num_sinks}")
    self.window, self.variant = int(window), variant
    self.num_sinks = int(num_sinks)  # window keys that never leave it (the ring keeps them in front)
    self.ring_size = self.num_sinks + (self.window if variant == "sw" else 2 * self.window)
    H, D = self.num_heads, self.head_dim
    self.feature_map_q = FeatureMap(feature_map, H, D)
    self.feature_map_k = FeatureMap(feature_map, H, D)
    self.feat_dim = ops.feature_dim(feature_map, D)
    self.init_window_factor = float(init_window_factor)
    logit = math.log(init_window_factor) - math.log1p(-init_window_factor)
    self.window_factors = nn.Parameter(torch.full((H,), logit))
    self.init_linear_factor = init_linear_factor
    self.linear_factors = None if init_linear_factor is None else nn.Parameter(
        torch.full((H,), float(init_linear_factor)))

  def _lf(self):
    """l_h = max(linear_factors_h, 0) [H] f32, or None (no linear factor)."""
    return None if self.linear_factors is None else torch.clamp(self.linear_factors.to(F32), min=0.0)

  def in_window(self, qp, kp):
    W = self.window
    win = (qp - kp < W) if self.variant == "sw" else (
        torch.div(kp, W, rounding_mode="floor") >= torch.div(qp, W, rounding_mode="floor") - 1)
    return win | (kp < self.num_sinks)

  def _over_keys(self, q, positions, kk, vv, kpos, kfolded, S):
    """Outputs over explicit keys (rotary, [B, S, Hkv, D]) plus the folded state S."""
    qp, kp = positions[:, :, None], kpos[:, None, :]
    vis = (kp >= 0) & (kp <= qp) & ~kfolded[:, None, :]
    win = self.in_window(qp, kp)
    kr, vr = ops.repeat_kv(kk, self.rep), ops.repeat_kv(vv, self.rep)
    num, den = ops.masked_attention(q, kr, vr, vis & win, self.head_dim ** -0.5,
                                    weights=torch.sigmoid(self.window_factors),
                                    return_parts=True)
    fq, fk = self.feature_map_q(q), self.feature_map_k(kr)
    a = _where((vis & ~win)[:, None], torch.einsum("bthf,bshf->bhts", fq, fk))
    lf = self._lf()
    if lf is not None:
      a = a * lf[None, :, None, None]
    num = num + torch.einsum("bhts,bshv->bthv", a, vr.to(F32))
    den = den + a.sum(-1).transpose(1, 2)
    if S is not None:
      o = torch.einsum("bthf,bhfv->bthv", fq, S)
      if lf is not None:
        o = o * lf[None, None, :, None]
      num, den = num + o[..., :-1], den + o[..., -1]
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]

  def _chunk(self, q, k, v, valid):
    """Blocked window softmax + the linear part through the chunked op; k, v per query head
    (with sinks: token index == position, so the first `num_sinks` tokens are the sinks)."""
    B, T, H, D = q.shape
    W = self.window
    fq, fk = self.feature_map_q(q), self.feature_map_k(k)
    if valid is not None:
      fk = _where(valid[:, :, None, None], fk)
    if self.num_sinks:  # sinks stay softmax keys: never linear
      fk = torch.cat([torch.zeros_like(fk[:, :self.num_sinks]), fk[:, self.num_sinks:]], 1)
    num, den = blocked_window(q, k, v, window=W, in_window=self.in_window, valid=valid,
                              scale=D ** -0.5, weights=torch.sigmoid(self.window_factors),
                              return_parts=True, sinks=self.num_sinks)
    vaug = torch.cat([v.to(F32), torch.ones_like(v[..., :1], dtype=F32)], -1)
    if self.variant == "sw":
      lin = torch.zeros(B, T, H, D + 1, dtype=F32, device=q.device)
      if T > W:  # query t + W reads the state after key t
        fq_shift = torch.cat([fq[:, W:], torch.zeros_like(fq[:, :W])], 1)
        o, _ = ops.gla(fq_shift, fk, vaug, None, scale=1.0, use_fla=self.use_fla)
        lin = torch.cat([torch.zeros_like(o[:, :W]), o[:, : T - W]], 1)
    else:  # tk: block b reads the keys of blocks <= b - 2
      nb = -(-T // W)
      pad = nb * W - T
      blocks = lambda a: F.pad(a, (0, 0, 0, 0, 0, pad)).reshape(B, nb, W, H, -1)
      kv = torch.einsum("bnjhf,bnjhv->bnhfv", blocks(fk), blocks(vaug))
      cum = torch.cumsum(kv, 1)
      st = torch.cat([torch.zeros_like(cum[:, :2]), cum[:, :-2]], 1)[:, :nb]
      lin = torch.einsum("bnihf,bnhfv->bnihv", blocks(fq), st).reshape(B, nb * W, H, -1)[:, :T]
    lf = self._lf()
    if lf is not None:
      lin = lin * lf[None, None, :, None]
    num, den = num + lin[..., :-1], den + lin[..., -1]
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]

  def _update(self, st, k, v, positions, valid):
    """The decode state after the new tokens: keys out of the newest token's window are
    folded into the linear state, the last `ring_size` keys stay in the ring."""
    B = k.shape[0]
    if not st:
      st = empty_ring(B, self.ring_size, self.num_kv_heads, self.head_dim, k.device,
                      folded=torch.zeros(B, self.ring_size, dtype=torch.bool, device=k.device),
                      state=torch.zeros(B, self.num_heads, self.feat_dim, self.head_dim + 1,
                                        dtype=F32, device=k.device))
    pos = positions if valid is None else _where(valid, positions, -1)
    last = last_position(positions, valid)[:, None]                 # [B, 1]
    kk, vv = torch.cat([st["k"], k.to(F32)], 1), torch.cat([st["v"], v.to(F32)], 1)
    kpos = torch.cat([st["pos"], pos], 1)
    kfold = torch.cat([st["folded"], torch.zeros_like(pos, dtype=torch.bool)], 1)
    fold = (kpos >= 0) & ~kfold & (kpos <= last) & ~self.in_window(last, kpos) & (last >= 0)
    fk = _where(fold[:, :, None, None], self.feature_map_k(ops.repeat_kv(kk, self.rep)))
    vr = ops.repeat_kv(vv, self.rep)
    vaug = torch.cat([vr, torch.ones_like(vr[..., :1])], -1)
    state = st["state"] + torch.einsum("bshf,bshv->bhfv", fk, vaug)
    keep = (pos >= 0) & ((pos > last - (self.ring_size - self.num_sinks)) | (pos < self.num_sinks))
    ring = ring_write(st, k, v, pos, keep, self.num_sinks)
    folded = (ring["pos"] >= 0) & ~self.in_window(last, ring["pos"])
    ring["folded"] = torch.where(last >= 0, folded, st["folded"])
    ring["state"] = state
    return ring

  def forward(self, x, *, cos, sin, positions, valid=None, cache=None):
    q, k, v = self.project(x)
    q, k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
    st = cache.state if cache is not None else {}
    if st:
      kk, vv = torch.cat([st["k"], k.to(F32)], 1), torch.cat([st["v"], v.to(F32)], 1)
      kpos = torch.cat([st["pos"], positions if valid is None else _where(valid, positions, -1)], 1)
      kfold = torch.cat([st["folded"], torch.zeros_like(positions, dtype=torch.bool)], 1)
      o = self._over_keys(q, positions, kk, vv, kpos, kfold, st["state"])
    elif contiguous(positions, valid, absolute=self.variant == "tk" or self.num_sinks > 0):
      o = self._chunk(q, ops.repeat_kv(k, self.rep), ops.repeat_kv(v, self.rep), valid)
    else:
      kpos = positions if valid is None else _where(valid, positions, -1)
      o = self._over_keys(q, positions, k, v, kpos, torch.zeros_like(kpos, dtype=torch.bool), None)
    if cache is not None:
      cache.state = self._update(st, k, v, positions, valid)
    return self.out(o, x)


class Liger(Mixer):
  """Liger: mix * softmax over a window (rotary q, k; plus the first `num_sinks` keys) +
  (1 - mix) * GLA with softmax feature maps on q, k (before rotary), gates
  logsigmoid(k) / gate_logit_normalizer, scale 1. `normalize`: the GLA branch divided by its
  own key-sum denominator (an all-ones value column in the same state); `learn_mix`: the mix
  per head, the parameter `window_mix` [H]."""

  def __init__(self, config, layer_idx, window=64, gate_logit_normalizer=16.0, mix=0.5,
               num_sinks=0, normalize=False, learn_mix=False):
    super().__init__(config, layer_idx)
    if int(num_sinks) < 0:
      raise ValueError(f"num_sinks must be >= 0, got {num_sinks}")
    self.window = int(window)
    self.num_sinks = int(num_sinks)
    self.gate_logit_normalizer = float(gate_logit_normalizer)
    self.mix = float(mix)
    self.normalize = bool(normalize)
    self.window_mix = (nn.Parameter(torch.full((self.num_heads,), self.mix)) if learn_mix
                       else None)

  def in_window(self, qp, kp):
    return (qp - kp < self.window) | (kp < self.num_sinks)

  def _mix(self, o_sw, o_lin):
    m = self.mix if self.window_mix is None else self.window_mix.to(F32)[None, None, :, None]
    return m * o_sw + (1 - m) * o_lin

  def forward(self, x, *, cos, sin, positions, valid=None, cache=None):
    q, k, v = self.project(x)
    B = x.shape[0]
    # AdaptiveAvgPool1d of k to Hkv * D outputs (Liger's gate) is the identity
    g = ops.repeat_kv(F.logsigmoid(k.to(F32)) / self.gate_logit_normalizer, self.rep)
    fq = torch.softmax(q.to(F32), -1)
    fk = ops.repeat_kv(torch.softmax(k.to(F32), -1), self.rep)
    vr = ops.repeat_kv(v, self.rep).to(F32)
    if self.normalize:
      vr = torch.cat([vr, torch.ones_like(vr[..., :1])], -1)
    qr, kr = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
    if valid is not None:
      fk, g = _where(valid[:, :, None, None], fk), _where(valid[:, :, None, None], g)
    st = cache.state if cache is not None else {}
    o_lin, S = ops.gla(fq, fk, vr, g, scale=1.0, initial_state=st.get("state"),
                       use_fla=self.use_fla)
    if self.normalize:
      o_lin = o_lin[..., :-1] / (o_lin[..., -1:] + 1e-6)
    pos = positions if valid is None else _where(valid, positions, -1)
    scale = self.head_dim ** -0.5
    if st:
      kk, vv = torch.cat([st["k"], kr.to(F32)], 1), torch.cat([st["v"], v.to(F32)], 1)
      kpos = torch.cat([st["pos"], pos], 1)
      qp, kp = positions[:, :, None], kpos[:, None, :]
      vis = (kp >= 0) & (kp <= qp) & self.in_window(qp, kp)
      o_sw = ops.masked_attention(qr, ops.repeat_kv(kk, self.rep), ops.repeat_kv(vv, self.rep),
                                  vis, scale)
    elif contiguous(positions, valid, absolute=self.num_sinks > 0):
      o_sw = blocked_window(qr, ops.repeat_kv(kr, self.rep), ops.repeat_kv(v, self.rep),
                            window=self.window, in_window=self.in_window, valid=valid,
                            scale=scale, sinks=self.num_sinks)
    else:
      qp, kp = positions[:, :, None], pos[:, None, :]
      vis = (kp >= 0) & (kp <= qp) & self.in_window(qp, kp)
      o_sw = ops.masked_attention(qr, ops.repeat_kv(kr, self.rep), ops.repeat_kv(v, self.rep),
                                  vis, scale)
    if cache is not None:
      if not st:
        st = empty_ring(B, self.num_sinks + self.window, self.num_kv_heads, self.head_dim,
                        x.device)
      last = last_position(positions, valid)[:, None]
      keep = (pos >= 0) & ((pos > last - self.window) | (pos < self.num_sinks))
      cache.state = {**ring_write(st, kr, v, pos, keep, self.num_sinks), "state": S}
    return self.out(self._mix(o_sw, o_lin), x)
