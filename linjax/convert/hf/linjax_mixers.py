"""The linjax token mixers in plain torch: what sits in `self_attn` of each layer.

Parameter names and layouts are linjax's (q_proj ... o_proj as `nn.Linear`, every parameter
added by linearizing stored exactly as linjax stores it), so the export copies tensors by name.
Each mixer runs

    forward(x, *, cos, sin, positions, valid, cache) -> y

x [B, T, hidden]; cos, sin [B, T, head_dim] (the Llama's rotary); positions [B, T] int;
valid [B, T] bool or None (False: padding, which nobody sees and no state absorbs); cache a
`LinjaxLayerCache` (its `.state` dict is the layer's decode state, empty before the first
call) or None for a full-sequence pass. Decode state per mixer:

  softmax         k, v, pos of every token (pos -1: padding); with a window a ring of
                  num_sinks + window slots
  linear family   {"state": [B, H, F, V(+1)]}: the recurrent state; the normalizer
                  phi(q).sum phi(k) rides along as an extra all-ones value column
  lolcats         the linear state plus a ring of the last `window` (sw) / `2 * window` (tk)
                  rotary keys and values, their positions and whether they are folded into
                  the state yet
  liger           the GLA state plus a ring of the last `window` keys and values

A full pass (or the prefill of an empty cache) runs the chunked forms; a cached call with a
non-empty cache attends over the ring plus the new tokens and starts from the stored state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import linjax_ops as ops
from .linjax_ops import F32  # noqa: F401 (a `from .x import` line is how transformers finds x.py)


def _where(mask, x, value=0.0):
  return torch.where(mask, x, torch.full((), value, dtype=x.dtype, device=x.device))


# --- windows: position arithmetic shared by the softmax, LoLCATs and Liger rings -----------

def ring_slots(pos, size, sinks=0):
  """Slot of each position in a ring of `size` slots whose first `sinks` hold the sinks."""
  ring = sinks + torch.remainder(pos - sinks, size - sinks)
  return torch.where(pos < sinks, pos, ring)


def empty_ring(B, size, heads, dim, device, **extra):
  r = {"k": torch.zeros(B, size, heads, dim, dtype=F32, device=device),
       "v": torch.zeros(B, size, heads, dim, dtype=F32, device=device),
       "pos": torch.full((B, size), -1, dtype=torch.long, device=device)}
  r.update(extra)
  return r


def ring_write(ring, k, v, pos, keep, sinks=0):
  """The ring with the kept new tokens written to their slots (slots must be distinct)."""
  B, T = pos.shape
  size = ring["pos"].shape[1]
  slots = torch.where(keep, ring_slots(pos, size, sinks), torch.full_like(pos, size))

  def put(buf, x):
    ext = torch.cat([buf, buf[:, :1]], 1)            # slot `size` collects dropped tokens
    idx = slots.reshape(B, T, *([1] * (x.dim() - 2))).expand_as(x)
    return ext.scatter(1, idx, x.to(ext.dtype))[:, :size]

  return {**ring, "k": put(ring["k"], k), "v": put(ring["v"], v), "pos": put(ring["pos"], pos)}


def last_position(positions, valid):
  """[B] the newest real position of each row (-1 where the row has none)."""
  real = positions if valid is None else _where(valid, positions, -1)
  return real.amax(1)


def contiguous(positions, valid, absolute=False):
  """Do real tokens sit at consecutive positions (index distance == position distance)?
  absolute=True: and position == index. Decides whether the blocked forms apply."""
  d = positions - torch.arange(positions.shape[1], device=positions.device)
  if valid is None:
    ok = (d == d[:, :1]).all()
    return bool(ok and (not absolute or (d == 0).all()))
  ref = _where(valid, d, torch.iinfo(d.dtype).max).amin(1, keepdim=True)
  ok = (~valid | (d == ref)).all()
  return bool(ok and (not absolute or (~valid | (d == 0)).all()))


def blocked_window(q, k, v, *, window, in_window, valid=None, scale, weights=None,
                   return_parts=False):
  """Softmax attention of each query over the keys of its own and the previous block of
  `window` tokens that `in_window(i, j)` (token indices) admits; k, v per query head.
  O(T * window) memory. Same outputs as `ops.masked_attention` over those keys."""
  B, T, H, D = q.shape
  W = window
  nb = -(-T // W)
  pad = nb * W - T
  padt = lambda a: F.pad(a, (0, 0) * (a.dim() - 2) + (0, pad)) if pad else a
  blocks = lambda a: padt(a).reshape(B, nb, W, *a.shape[2:])
  prev = lambda a: torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], 1)
  qb, kb, vb = blocks(q.to(F32)), blocks(k.to(F32)), blocks(v.to(F32))
  k2, v2 = torch.cat([prev(kb), kb], 2), torch.cat([prev(vb), vb], 2)   # [B, nb, 2W, H, *]
  dev = q.device
  i = torch.arange(nb, device=dev)[:, None] * W + torch.arange(W, device=dev)[None]
  j = (torch.arange(nb, device=dev)[:, None] - 1) * W + torch.arange(2 * W, device=dev)[None]
  ok = (j[:, None] >= 0) & (j[:, None] <= i[:, :, None]) & (j[:, None] < T)
  ok = (ok & in_window(i[:, :, None], j[:, None]))[None]                # [1, nb, W, 2W]
  if valid is not None:
    vb_ = blocks(valid)
    ok = ok & torch.cat([prev(vb_), vb_], 2)[:, :, None, :]
  s = torch.einsum("bnihd,bnjhd->bnhij", qb, k2) * scale
  okh = ok[:, :, None]
  s = _where(okh, s, ops.NEG)
  m = s.amax(-1, keepdim=True)
  p = _where(okh, torch.exp(s - m))
  if weights is not None:
    p = p * weights.to(F32)[None, None, :, None, None]
  num = torch.einsum("bnhij,bnjhv->bnihv", p, v2).reshape(B, nb * W, H, -1)[:, :T]
  den = p.sum(-1).transpose(2, 3).reshape(B, nb * W, H)[:, :T]
  if return_parts:
    return num, den
  return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


# --- the projections every mixer shares with the softmax teacher ------------------------

class FeatureMap(nn.Module):
  """phi over `num_heads` heads; learned kinds hold weight [H, D, D] (+ bias [H, D] for t2r)."""

  def __init__(self, kind, num_heads, head_dim):
    super().__init__()
    if kind not in ops.FEATURE_MAPS:
      raise ValueError(f"unknown feature map {kind!r}; one of {ops.FEATURE_MAPS}")
    self.kind = kind
    if kind in ops.LEARNED_MAPS:
      self.weight = nn.Parameter(torch.eye(head_dim).expand(num_heads, head_dim, head_dim).clone())
      self.bias = nn.Parameter(torch.zeros(num_heads, head_dim)) if kind == "t2r" else None
    else:
      self.weight = self.bias = None

  def forward(self, x):
    return ops.feature_map(self.kind, x, self.weight, self.bias)


class Mixer(nn.Module):
  """q/k/v/o projections laid out like the Llama's softmax attention (HF names)."""

  def __init__(self, config, layer_idx):
    super().__init__()
    self.layer_idx = layer_idx
    self.num_layers = config.num_hidden_layers
    self.hidden_size = h = config.hidden_size
    self.num_heads = H = config.num_attention_heads
    self.num_kv_heads = Hkv = config.num_key_value_heads
    self.head_dim = D = config.head_dim
    self.rep = H // Hkv
    self.use_fla = getattr(config, "use_fla", True)
    b = config.attention_bias
    self.q_proj = nn.Linear(h, H * D, bias=b)
    self.k_proj = nn.Linear(h, Hkv * D, bias=b)
    self.v_proj = nn.Linear(h, Hkv * D, bias=b)
    self.o_proj = nn.Linear(H * D, h, bias=b)

  def project(self, x):
    B, T, _ = x.shape
    return (self.q_proj(x).view(B, T, self.num_heads, self.head_dim),
            self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim),
            self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim))

  def out(self, o, x):
    B, T = o.shape[:2]
    return self.o_proj(o.reshape(B, T, -1).to(x.dtype))


# --- softmax ----------------------------------------------------------------------------

class SoftmaxAttention(Mixer):
  """Causal softmax attention; `window` keeps the last `window` keys plus `num_sinks` first."""

  default_window, default_num_sinks = None, 0

  def __init__(self, config, layer_idx, window=-1, num_sinks=-1):
    super().__init__(config, layer_idx)
    self.window = self.default_window if window == -1 else window
    self.num_sinks = self.default_num_sinks if num_sinks == -1 else int(num_sinks)

  def visible(self, qp, kp):
    vis = (kp >= 0) & (kp <= qp)
    if self.window is not None:
      vis &= (qp - kp < self.window) | (kp < self.num_sinks)
    return vis

  def forward(self, x, *, cos, sin, positions, valid=None, cache=None):
    q, k, v = self.project(x)
    q, k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
    pos = positions if valid is None else _where(valid, positions, -1)
    st = cache.state if cache is not None else {}
    if cache is not None and self.window is not None and not st:
      st = empty_ring(x.shape[0], self.num_sinks + self.window, self.num_kv_heads,
                      self.head_dim, x.device)
    if st:
      kk, vv = torch.cat([st["k"], k.to(F32)], 1), torch.cat([st["v"], v.to(F32)], 1)
      kpos = torch.cat([st["pos"], pos], 1)
    else:
      kk, vv, kpos = k, v, pos
    vis = self.visible(positions[:, :, None], kpos[:, None, :])
    o = ops.masked_attention(q, ops.repeat_kv(kk, self.rep), ops.repeat_kv(vv, self.rep), vis,
                             self.head_dim ** -0.5)
    if cache is not None:
      if self.window is None:
        cache.state = {"k": kk.to(F32), "v": vv.to(F32), "pos": kpos}
      else:
        last = last_position(positions, valid)[:, None]
        keep = (pos >= 0) & ((pos > last - self.window) | (pos < self.num_sinks))
        cache.state = ring_write(st, k, v, pos, keep, self.num_sinks)
    return self.out(o, x)


class SlidingWindowAttention(SoftmaxAttention):
  default_window, default_num_sinks = 64, 4


# --- the linear family --------------------------------------------------------------------

def alibi_slopes(n):
  def pow2(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  if math.log2(n).is_integer():
    return pow2(n)
  c = 2 ** math.floor(math.log2(n))
  return pow2(c) + alibi_slopes(2 * c)[0::2][: n - c]


def decay_log(kind, num_heads, layer_idx=0, num_layers=1):
  """Per-head log decay (<= 0) [H] float32 of the fixed-decay mixers (linjax's formulas)."""
  cpu = torch.device("cpu")  # real numbers even while transformers builds on the meta device
  if kind == "retnet":
    return torch.log(1.0 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=F32, device=cpu)))
  slopes = torch.tensor(alibi_slopes(num_heads), dtype=F32, device=cpu)
  if kind == "alibi":
    return -slopes
  if kind == "lightning":
    return -slopes * (1.0 - layer_idx / max(num_layers - 1, 1) + 1e-5)
  raise ValueError(f"unknown decay {kind!r}; one of retnet, alibi, lightning")


class LinearMixer(Mixer):
  """S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t (or the delta rule), o_t = scale phi(q_t) S_t.
  Subclasses give `features(x, cos, sin) -> (phi(q), phi(k), v, g, beta)` per query head."""

  normalize = "denominator"   # "denominator" | "groupnorm" | "rmsnorm" | None
  delta = False
  eps = 1e-6

  @property
  def scale(self):
    return 1.0 if self.normalize == "denominator" else self.feat_dim ** -0.5

  def post(self, o):
    if self.normalize == "denominator":
      return o[..., :-1] / (o[..., -1:] + self.eps)
    if self.normalize == "groupnorm":
      mu = o.mean(-1, keepdim=True)
      return (o - mu) * torch.rsqrt(((o - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    if self.normalize == "rmsnorm":
      o = o * torch.rsqrt((o * o).mean(-1, keepdim=True) + 1e-5)
      return o * self.o_norm.to(F32)
    return o

  def forward(self, x, *, cos, sin, positions, valid=None, cache=None):
    qf, kf, v, g, beta = self.features(x, cos, sin)
    v = v.to(F32)
    if self.normalize == "denominator":
      v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    if valid is not None:  # padding leaves the state as it is
      kf = _where(valid[:, :, None, None], kf)
      if g is not None:
        g = _where(valid[:, :, None, None] if g.dim() == 4 else valid[:, :, None], g)
      if beta is not None:
        beta = _where(valid[:, :, None], beta)
    S0 = cache.state.get("state") if cache is not None else None
    if self.delta:
      o, S = ops.delta_rule(qf, kf, v, beta, g, scale=self.scale, initial_state=S0,
                            use_fla=self.use_fla)
    else:
      o, S = ops.gla(qf, kf, v, g, scale=self.scale, initial_state=S0, use_fla=self.use_fla)
    if cache is not None:
      cache.state = {"state": S}
    return self.out(self.post(o), x)


class LinearAttention(LinearMixer):
  """phi(q) sum phi(k)^T v / phi(q) . sum phi(k) with any feature map, optional fixed decay."""

  def __init__(self, config, layer_idx, feature_map="hedgehog", normalize="denominator",
               rotary="before", tie_qk=False, decay=None):
    super().__init__(config, layer_idx)
    if rotary == "after" and feature_map in ("hedgehog", "dpfp", "softmax", "t2r", "relu", "elu"):
      raise ValueError("rotary='after' needs a feature map that keeps the head dim layout "
                       "(identity / l2 / silu_l2)")
    self.normalize, self.rotary, self.tie_qk = normalize, rotary, tie_qk
    self.feature_map_q = FeatureMap(feature_map, self.num_heads, self.head_dim)
    self.feature_map_k = None if tie_qk else FeatureMap(feature_map, self.num_heads,
                                                        self.head_dim)
    self.feat_dim = ops.feature_dim(feature_map, self.head_dim)
    self.decay = decay
    self.log_decay = (None if decay is None else
                      decay_log(decay, self.num_heads, layer_idx, self.num_layers).tolist())

  def _decay(self, like):
    if self.log_decay is None:
      return None
    g = torch.tensor(self.log_decay, dtype=F32, device=like.device)
    return g.expand(*like.shape[:3])

  def features(self, x, cos, sin):
    q, k, v = self.project(x)
    k, v = ops.repeat_kv(k, self.rep), ops.repeat_kv(v, self.rep)
    if self.rotary == "before":
      q, k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
    qf = self.feature_map_q(q)
    kf = (self.feature_map_q if self.tie_qk else self.feature_map_k)(k)
    if self.rotary == "after":
      qf, kf = ops.rotate(qf, cos, sin), ops.rotate(kf, cos, sin)
    return qf, kf, v, self._decay(qf), None


class Retention(LinearAttention):
  def __init__(self, config, layer_idx, feature_map="identity", normalize="groupnorm",
               decay="retnet", rotary="before", tie_qk=False):
    super().__init__(config, layer_idx, feature_map=feature_map, normalize=normalize,
                     decay=decay, rotary=rotary, tie_qk=tie_qk)


class Lightning(LinearAttention):
  def __init__(self, config, layer_idx, feature_map="identity", normalize="groupnorm",
               decay="lightning", rotary="before", tie_qk=False):
    super().__init__(config, layer_idx, feature_map=feature_map, normalize=normalize,
                     decay=decay, rotary=rotary, tie_qk=tie_qk)


class GLA(LinearAttention):
  """Per-key-channel decay g = logsigmoid((x W1) W2 + b) / gate_logit_normalizer."""

  def __init__(self, config, layer_idx, feature_map="identity", normalize="groupnorm",
               gate_logit_normalizer=16.0, gate_low_rank_dim=16, gate_bias_init=4.0,
               rotary="before", tie_qk=False, decay=None):
    super().__init__(config, layer_idx, feature_map=feature_map, normalize=normalize,
                     rotary=rotary, tie_qk=tie_qk, decay=decay)
    self.gate_logit_normalizer = float(gate_logit_normalizer)
    self.gate_bias_init = float(gate_bias_init)
    n = self.num_heads * self.feat_dim
    self.gk_w1 = nn.Parameter(torch.zeros(self.hidden_size, gate_low_rank_dim))
    self.gk_w2 = nn.Parameter(torch.zeros(gate_low_rank_dim, n))
    self.gk_b = nn.Parameter(torch.full((n,), self.gate_bias_init))

  def features(self, x, cos, sin):
    qf, kf, v, _, _ = super().features(x, cos, sin)
    B, T, _ = x.shape
    z = (x.to(F32) @ self.gk_w1.to(F32)) @ self.gk_w2.to(F32) + self.gk_b.to(F32)
    g = F.logsigmoid(z).reshape(B, T, self.num_heads, self.feat_dim) / self.gate_logit_normalizer
    return qf, kf, v, g, None


class DeltaNet(LinearMixer):
  """Delta rule with beta = sigmoid(x b_w + b_b) (x2 with allow_neg_eigval); gated:
  g = -exp(A_log) softplus(x a_w + dt_bias); per-head RMSNorm on the output."""

  delta = True

  def __init__(self, config, layer_idx, feature_map="silu_l2", allow_neg_eigval=False,
               gated=False, rotary="before", normalize="rmsnorm"):
    super().__init__(config, layer_idx)
    self.normalize, self.rotary = normalize, rotary
    self.allow_neg_eigval, self.gated = allow_neg_eigval, gated
    H, D, h = self.num_heads, self.head_dim, self.hidden_size
    self.feature_map_q = FeatureMap(feature_map, H, D)
    self.feature_map_k = FeatureMap(feature_map, H, D)
    self.feat_dim = ops.feature_dim(feature_map, D)
    self.b_w = nn.Parameter(torch.zeros(h, H))
    self.b_b = nn.Parameter(torch.zeros(H))
    if gated:
      self.a_w = nn.Parameter(torch.zeros(h, H))
      self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, H)))
      dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), H))
      self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
    if normalize == "rmsnorm":
      self.o_norm = nn.Parameter(torch.ones(D))

  @property
  def scale(self):
    return self.feat_dim ** -0.5

  def features(self, x, cos, sin):
    q, k, v = self.project(x)
    k, v = ops.repeat_kv(k, self.rep), ops.repeat_kv(v, self.rep)
    if self.rotary == "before":
      q, k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
    qf, kf = self.feature_map_q(q), self.feature_map_k(k)
    xf = x.to(F32)
    beta = torch.sigmoid(xf @ self.b_w.to(F32) + self.b_b.to(F32))
    if self.allow_neg_eigval:
      beta = 2.0 * beta
    g = None
    if self.gated:
      g = -torch.exp(self.A_log.to(F32)) * F.softplus(xf @ self.a_w.to(F32) + self.dt_bias.to(F32))
    return qf, kf, v, g, beta


class GatedDeltaNet(DeltaNet):
  def __init__(self, config, layer_idx, gated=True, **kw):
    super().__init__(config, layer_idx, gated=gated, **kw)


class Supra(LinearMixer):
  """SUPRA: phi = rotary(relu(W x + b)) over the concatenated heads (one W for q and k under
  MHA, one each under GQA), a fixed per-head decay, GroupNorm instead of the denominator."""

  normalize = "groupnorm"

  def __init__(self, config, layer_idx, decay="alibi"):
    super().__init__(config, layer_idx)
    H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
    self.feat_dim = D
    self.tied = H == Hkv
    self.phi_q_w = nn.Parameter(torch.eye(H * D))
    self.phi_q_b = nn.Parameter(torch.zeros(H * D))
    if not self.tied:
      self.phi_k_w = nn.Parameter(torch.eye(Hkv * D))
      self.phi_k_b = nn.Parameter(torch.zeros(Hkv * D))
    self.decay = decay
    self.log_decay = decay_log(decay, H, layer_idx, self.num_layers).tolist()

  def features(self, x, cos, sin):
    q, k, v = self.project(x)
    B, T = x.shape[:2]
    H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
    wq, bq = self.phi_q_w.to(F32), self.phi_q_b.to(F32)
    wk, bk = (wq, bq) if self.tied else (self.phi_k_w.to(F32), self.phi_k_b.to(F32))
    qf = F.relu(q.reshape(B, T, H * D).to(F32) @ wq + bq).reshape(B, T, H, D)
    kf = F.relu(k.reshape(B, T, Hkv * D).to(F32) @ wk + bk).reshape(B, T, Hkv, D)
    qf, kf = ops.rotate(qf, cos, sin), ops.rotate(kf, cos, sin)
    kf, v = ops.repeat_kv(kf, self.rep), ops.repeat_kv(v, self.rep)
    g = torch.tensor(self.log_decay, dtype=F32, device=x.device).expand(B, T, H)
    return qf, kf, v, g, None


# --- hybrids ------------------------------------------------------------------------------

class Lolcats(Mixer):
  """LoLCATs: softmax over a window plus Hedgehog linear attention, one shared denominator:

      y_i = (sum_win w_h exp(s_ij - m_i) v_j + sum_lin phi(q_i).phi(k_j) v_j)
            / (sum_win w_h exp(s_ij - m_i)   + sum_lin phi(q_i).phi(k_j)),   w_h = sigmoid(window_factors_h)

  key j is in the window of query i when i - j < window ("sw") or block(j) >= block(i) - 1
  with block = pos // window ("tk"); every other earlier key is linear.
  """

  def __init__(self, config, layer_idx, window=64, variant="sw", feature_map="hedgehog",
               init_window_factor=0.1):
    super().__init__(config, layer_idx)
    if variant not in ("sw", "tk"):
      raise ValueError(f"variant must be 'sw' or 'tk', got {variant!r}")
    self.window, self.variant = int(window), variant
    self.num_sinks = 0  # window keys that never leave it (the ring keeps them in front)
    self.ring_size = self.num_sinks + (self.window if variant == "sw" else 2 * self.window)
    H, D = self.num_heads, self.head_dim
    self.feature_map_q = FeatureMap(feature_map, H, D)
    self.feature_map_k = FeatureMap(feature_map, H, D)
    self.feat_dim = ops.feature_dim(feature_map, D)
    self.init_window_factor = float(init_window_factor)
    logit = math.log(init_window_factor) - math.log1p(-init_window_factor)
    self.window_factors = nn.Parameter(torch.full((H,), logit))

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
    num = num + torch.einsum("bhts,bshv->bthv", a, vr.to(F32))
    den = den + a.sum(-1).transpose(1, 2)
    if S is not None:
      o = torch.einsum("bthf,bhfv->bthv", fq, S)
      num, den = num + o[..., :-1], den + o[..., -1]
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]

  def _chunk(self, q, k, v, valid):
    """Blocked window softmax + the linear part through the chunked op; k, v per query head."""
    B, T, H, D = q.shape
    W = self.window
    fq, fk = self.feature_map_q(q), self.feature_map_k(k)
    if valid is not None:
      fk = _where(valid[:, :, None, None], fk)
    num, den = blocked_window(q, k, v, window=W, in_window=self.in_window, valid=valid,
                              scale=D ** -0.5, weights=torch.sigmoid(self.window_factors),
                              return_parts=True)
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
    elif self.num_sinks == 0 and contiguous(positions, valid, absolute=self.variant == "tk"):
      o = self._chunk(q, ops.repeat_kv(k, self.rep), ops.repeat_kv(v, self.rep), valid)
    else:
      kpos = positions if valid is None else _where(valid, positions, -1)
      o = self._over_keys(q, positions, k, v, kpos, torch.zeros_like(kpos, dtype=torch.bool), None)
    if cache is not None:
      cache.state = self._update(st, k, v, positions, valid)
    return self.out(o, x)


class Liger(Mixer):
  """Liger: mix * softmax over a window (rotary q, k) + (1 - mix) * GLA with softmax feature
  maps on q, k (before rotary), gates logsigmoid(k) / gate_logit_normalizer, scale 1."""

  def __init__(self, config, layer_idx, window=64, gate_logit_normalizer=16.0, mix=0.5):
    super().__init__(config, layer_idx)
    self.window = int(window)
    self.num_sinks = 0
    self.gate_logit_normalizer = float(gate_logit_normalizer)
    self.mix = float(mix)

  def in_window(self, qp, kp):
    return (qp - kp < self.window) | (kp < self.num_sinks)

  def forward(self, x, *, cos, sin, positions, valid=None, cache=None):
    q, k, v = self.project(x)
    B = x.shape[0]
    # AdaptiveAvgPool1d of k to Hkv * D outputs (Liger's gate) is the identity
    g = ops.repeat_kv(F.logsigmoid(k.to(F32)) / self.gate_logit_normalizer, self.rep)
    fq = torch.softmax(q.to(F32), -1)
    fk = ops.repeat_kv(torch.softmax(k.to(F32), -1), self.rep)
    vr = ops.repeat_kv(v, self.rep).to(F32)
    qr, kr = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
    if valid is not None:
      fk, g = _where(valid[:, :, None, None], fk), _where(valid[:, :, None, None], g)
    st = cache.state if cache is not None else {}
    o_lin, S = ops.gla(fq, fk, vr, g, scale=1.0, initial_state=st.get("state"),
                       use_fla=self.use_fla)
    pos = positions if valid is None else _where(valid, positions, -1)
    scale = self.head_dim ** -0.5
    if st:
      kk, vv = torch.cat([st["k"], kr.to(F32)], 1), torch.cat([st["v"], v.to(F32)], 1)
      kpos = torch.cat([st["pos"], pos], 1)
      qp, kp = positions[:, :, None], kpos[:, None, :]
      vis = (kp >= 0) & (kp <= qp) & self.in_window(qp, kp)
      o_sw = ops.masked_attention(qr, ops.repeat_kv(kk, self.rep), ops.repeat_kv(vv, self.rep),
                                  vis, scale)
    elif self.num_sinks == 0 and contiguous(positions, valid):
      o_sw = blocked_window(qr, ops.repeat_kv(kr, self.rep), ops.repeat_kv(v, self.rep),
                            window=self.window, in_window=self.in_window, valid=valid,
                            scale=scale)
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
    return self.out(self.mix * o_sw + (1 - self.mix) * o_lin, x)


MIXERS = {
    "softmax": SoftmaxAttention, "sliding_window": SlidingWindowAttention,
    "linear": LinearAttention, "retention": Retention, "lightning": Lightning, "gla": GLA,
    "deltanet": DeltaNet, "gated_deltanet": GatedDeltaNet, "supra": Supra,
    "lolcats": Lolcats, "liger": Liger,
}
