"""The linjax token mixers in plain torch (softmax and the linear family here, the hybrids in
`linjax_hybrid`): what sits in `self_attn` of each layer.

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
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from . import linjax_ops as ops
from .linjax_ops import F32  # noqa: F401 (a `from .x import` line is how transformers finds x.py)
from .linjax_window import _where, empty_ring, last_position, ring_write


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
  """q/k/v/o projections laid out like the Llama's softmax attention (HF names): biases on all
  four (`attention_bias`) or on q/k/v only (`qkv_bias`, Qwen2), and with `qk_norm` (Qwen3) an
  RMSNorm of q and k per head (`q_norm`, `k_norm`) before rotary."""

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
    b = bool(config.attention_bias)
    bqkv = b or bool(getattr(config, "qkv_bias", False))
    self.q_proj = nn.Linear(h, H * D, bias=bqkv)
    self.k_proj = nn.Linear(h, Hkv * D, bias=bqkv)
    self.v_proj = nn.Linear(h, Hkv * D, bias=bqkv)
    self.o_proj = nn.Linear(H * D, h, bias=b)
    if getattr(config, "qk_norm", False):
      self.q_norm = LlamaRMSNorm(D, eps=config.rms_norm_eps)
      self.k_norm = LlamaRMSNorm(D, eps=config.rms_norm_eps)
    else:
      self.q_norm = self.k_norm = None

  def project(self, x):
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def out(self, o, x):
    B, T = o.shape[:2]
    return self.o_proj(o.reshape(B, T, -1).to(x.dtype))


# --- softmax ----------------------------------------------------------------------------

def layer_window(config, layer_idx):
  """The teacher's softmax window of a layer: `sliding_window` on the layers `layer_types`
  marks "sliding_attention" (every layer when layer_types is None), else None."""
  w = getattr(config, "sliding_window", None)
  types = getattr(config, "layer_types", None)
  if w is None or (types is not None and types[layer_idx] != "sliding_attention"):
    return None
  return int(w)


class SoftmaxAttention(Mixer):
  """Causal softmax attention; `window` keeps the last `window` keys plus `num_sinks` first
  (default: the config's sliding window of this layer, if any)."""

  default_window, default_num_sinks = None, 0

  def __init__(self, config, layer_idx, window=-1, num_sinks=-1):
    super().__init__(config, layer_idx)
    if window == -1:
      window = self.default_window
      if window is None:
        window = layer_window(config, layer_idx)
    self.window = window
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
      o = (o - mu) * torch.rsqrt(((o - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
      if getattr(self, "norm_scale", None) is not None:   # per-head affine (SUPRA option)
        o = o * self.norm_scale.to(F32) + self.norm_bias.to(F32)
      return o
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
  MHA, one each under GQA), a fixed per-head decay, GroupNorm instead of the denominator;
  `norm_affine`: a per-head, per-channel affine after it (`norm_scale`, `norm_bias` [H, D])."""

  normalize = "groupnorm"

  def __init__(self, config, layer_idx, decay="alibi", norm_affine=False):
    super().__init__(config, layer_idx)
    H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
    self.feat_dim = D
    self.tied = H == Hkv
    self.phi_q_w = nn.Parameter(torch.eye(H * D))
    self.phi_q_b = nn.Parameter(torch.zeros(H * D))
    if not self.tied:
      self.phi_k_w = nn.Parameter(torch.eye(Hkv * D))
      self.phi_k_b = nn.Parameter(torch.zeros(Hkv * D))
    self.norm_scale = nn.Parameter(torch.ones(H, D)) if norm_affine else None
    self.norm_bias = nn.Parameter(torch.zeros(H, D)) if norm_affine else None
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
