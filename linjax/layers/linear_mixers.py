"""Linear-attention token mixers: drop-ins for the softmax slot of a Llama layer.

Every mixer keeps the teacher's `q_proj`, `k_proj`, `v_proj`, `o_proj` (so `linjax.linearize`
copies weights by name), adds only `FeatureMapParam`s, and runs the recurrence

    S_t = exp(g_t) * S_{t-1} + phi(k_t)^T v_t           (linear / retention / GLA / SUPRA)
    S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t^T v_t      (DeltaNet, gated DeltaNet)
    o_t = scale * phi(q_t) S_t

in one of three modes that agree (`mixer.mode`):

  "quadratic"  the masked T x T form (attention weights exist: distillation)
  "chunk"      `linjax.parallel.sequence.gla / delta_rule` (LASP-2 under a `seq` mesh, else
               `linjax.ops`): training, packed rows (`segment_ids`) included
  "recurrent"  a token-by-token `lax.scan` of the decode step

Decoding (`cache` given) keeps an O(1) state per layer: `{"state": [B, H, F, V(+1)] f32}`.
The normalizing denominator phi(q_t) . sum_s phi(k_s) rides along as an extra all-ones value
column, so it is part of the same state and the same op call. Tokens with segment id 0 in a
cached call are padding: they leave the state untouched.

GQA: k and v are repeated to the query heads before the feature map (as LoLCATs and Liger
do), so every recurrent state is per query head.

Registered: "linear", "retention", "lightning", "gla", "deltanet", "gated_deltanet", "supra".
"""
from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from linjax.layers.feature_maps import FeatureMap, feature_dim, feature_map_fn
from linjax.layers.mixers import register_mixer
from linjax.layers.params import FeatureMapParam

MODES = ("quadratic", "chunk", "recurrent")


# ----------------------------------------------------------------------------------------
# shared helpers (also used by hybrid_mixers)
# ----------------------------------------------------------------------------------------

def _cfg(config, name, default=None):
  return getattr(config, name, default) if not isinstance(config, dict) else config.get(name, default)


def head_dims(config):
  hidden = _cfg(config, "hidden_size")
  H = _cfg(config, "num_attention_heads")
  Hkv = _cfg(config, "num_key_value_heads") or H
  D = _cfg(config, "head_dim") or hidden // H
  return hidden, H, Hkv, D


def rotary(x, positions, config):
  """The Llama's rotary (HF rotate_half layout, default / linear / llama3 scaling)."""
  from linjax.layers import rotary as _rot
  freqs = _rot.inv_freq(head_dims(config)[3], float(_cfg(config, "rope_theta", 10000.0)),
                        _cfg(config, "rope_scaling", None),
                        _cfg(config, "max_position_embeddings", None))
  return _rot.apply_rotary(x, positions, jnp.asarray(freqs, jnp.float32))


def repeat_kv(x, rep):
  return x if rep == 1 else jnp.repeat(x, rep, axis=2)


def _op(name):
  """`linjax.parallel.sequence.<name>` when present, else `linjax.ops.<name>`, else reference."""
  for mod in ("linjax.parallel.sequence", "linjax.ops"):
    try:
      fn = getattr(importlib.import_module(mod), name, None)
    except ImportError:
      fn = None
    if callable(fn):
      return fn
  from linjax.ops import reference
  return getattr(reference, name)


def call_op(name, *args, method="chunk", **kw):
  if name in ("gla", "delta_rule"):
    kw["method"] = method
  return _op(name)(*args, **kw)


def segment_masks(positions, segment_ids):
  """Causal (by position) & same-segment visibility [B, T, T]."""
  qp, kp = positions[:, :, None], positions[:, None, :]
  vis = kp <= qp
  if segment_ids is not None:
    vis &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return vis


def recurrent_scan(q, k, v, g=None, beta=None, *, scale, initial_state=None, reset=None,
                   update=None):
  """Token-by-token gated linear / delta-rule recurrence, f32.

  q, k: [B, T, H, F]; v: [B, T, H, V]; g: None | [B, T, H] | [B, T, H, F]; beta: None (no
  delta rule) | [B, T, H]. reset [B, T] bool zeroes the state before a token; update [B, T]
  bool False skips a token (padding). Returns (o [B, T, H, V] f32, final state).
  """
  B, T, H, F = q.shape
  V = v.shape[-1]
  S0 = jnp.zeros((B, H, F, V), jnp.float32) if initial_state is None else initial_state
  f32 = lambda a: None if a is None else jnp.swapaxes(a.astype(jnp.float32), 0, 1)
  rs = jnp.zeros((B, T), bool) if reset is None else reset
  up = jnp.ones((B, T), bool) if update is None else update
  xs = (f32(q), f32(k), f32(v), f32(g), f32(beta), jnp.swapaxes(rs, 0, 1), jnp.swapaxes(up, 0, 1))

  def step(S, x):
    qt, kt, vt, gt, bt, rt, ut = x
    S_in = S
    S = jnp.where(rt[:, None, None, None], 0.0, S)
    if gt is not None:
      d = jnp.exp(gt)
      S = S * (d[:, :, None, None] if d.ndim == 2 else d[:, :, :, None])
    if bt is not None:
      pred = jnp.einsum("bhk,bhkv->bhv", kt, S)
      S = S + bt[:, :, None, None] * kt[:, :, :, None] * (vt - pred)[:, :, None, :]
    else:
      S = S + kt[:, :, :, None] * vt[:, :, None, :]
    S = jnp.where(ut[:, None, None, None], S, S_in)
    return S, scale * jnp.einsum("bhk,bhkv->bhv", qt, S)

  S, o = jax.lax.scan(step, S0, xs)
  return jnp.swapaxes(o, 0, 1), S


def quadratic_gla(q, k, v, g, *, scale, vis):
  """o_i = scale * sum_{j visible} exp(G_i - G_j) (q_i . k_j) v_j; g None or [B, T, H].

  Returns (o [B, T, H, V] f32, weights [B, H, T, T] f32 (already masked and decayed)).
  """
  s = jnp.einsum("bihf,bjhf->bhij", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  vis = vis[:, None]
  if g is not None:
    G = jnp.cumsum(g.astype(jnp.float32), axis=1)  # [B, T, H]
    diff = G.transpose(0, 2, 1)[:, :, :, None] - G.transpose(0, 2, 1)[:, :, None, :]
    s = s * jnp.exp(jnp.where(vis, diff, -jnp.inf))
  a = jnp.where(vis, s, 0.0)
  return jnp.einsum("bhij,bjhv->bihv", a, v.astype(jnp.float32)), a


def alibi_slopes(n):
  def pow2(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  if math.log2(n).is_integer():
    return pow2(n)
  c = 2 ** math.floor(math.log2(n))
  return pow2(c) + alibi_slopes(2 * c)[0::2][: n - c]


def decay_log(kind, num_heads, layer_idx=0, num_layers=1):
  """Per-head log decay (<= 0) [H] for the fixed-decay mixers."""
  if kind == "retnet":
    return jnp.log(1.0 - 2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32)))
  slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
  if kind == "alibi":
    return -slopes
  if kind == "lightning":  # TransNormerLLM / Lightning: slopes shrink with depth
    return -slopes * (1.0 - layer_idx / max(num_layers - 1, 1) + 1e-5)
  raise ValueError(f"unknown decay {kind!r}; one of retnet, alibi, lightning")


def group_norm(o, eps=1e-5):
  """Per-head normalization over the value dim, no affine (SUPRA / RetNet GroupNorm)."""
  mu = o.mean(-1, keepdims=True)
  var = ((o - mu) ** 2).mean(-1, keepdims=True)
  return (o - mu) * jax.lax.rsqrt(var + eps)


NEG = -1e30


def softmax_heads(q, k, v, *, vis, scale):
  """Teacher: causal softmax attention per head. Returns (y [B,T,H,V], p [B,H,T,T])."""
  f32 = jnp.float32
  s = jnp.einsum("bihd,bjhd->bhij", q.astype(f32), k.astype(f32)) * scale
  s = jnp.where(vis[:, None], s, NEG)
  p = jax.nn.softmax(s, -1)
  p = jnp.where(vis[:, None], p, 0.0)
  return jnp.einsum("bhij,bjhv->bihv", p, v.astype(f32)), p


def transfer_loss(student_w, teacher_p, student_y, teacher_y, kind, row_mask=None):
  """Attention-transfer loss of one layer: "mse" on head outputs or "xent" on weights."""
  if kind == "mse":
    err = ((student_y - teacher_y) ** 2).mean(-1).mean(-1)  # [B, T]
    if row_mask is None:
      return err.mean()
    return (err * row_mask).sum() / jnp.maximum(row_mask.sum(), 1)
  if kind == "xent":
    ce = -(teacher_p * jnp.log(jnp.maximum(student_w, 1e-12))).sum(-1)  # [B, H, T]
    ce = ce.mean(1)
    if row_mask is None:
      return ce.mean()
    return (ce * row_mask).sum() / jnp.maximum(row_mask.sum(), 1)
  raise ValueError(f"unknown transfer loss {kind!r}")


class DistillMixin:
  """`mixer.distill = "mse" | "xent"` makes a full-sequence call return the *teacher's*
  softmax output (so the next layer sees teacher hidden states) and sow this layer's
  attention-transfer loss as `nnx.Intermediate` "transfer_loss". The loss is computed under
  `jax.checkpoint`, so no T x T tensor outlives the layer."""

  distill = None

  def _distill_call(self, x, positions, segment_ids):
    q, k, v = self.project(x)
    rep = self.num_heads // self.num_kv_heads
    q = rotary(q, positions, self.config)
    k = repeat_kv(rotary(k, positions, self.config), rep)
    v = repeat_kv(v, rep)
    vis = segment_masks(positions, segment_ids)
    scale = self.head_dim ** -0.5
    params = self.student_params()
    kind = self.distill

    @jax.checkpoint
    def layer_loss(params, q, k, v):
      ty, tp = softmax_heads(q, k, v, vis=vis, scale=scale)
      sy, sw = self.student_quadratic(params, q, k, v, positions, vis)
      row = None if segment_ids is None else (segment_ids > 0).astype(jnp.float32)
      return transfer_loss(sw, jax.lax.stop_gradient(tp), sy, jax.lax.stop_gradient(ty),
                           kind, row), ty

    loss, ty = layer_loss(params, q, k, v)
    self.sow(nnx.Intermediate, "transfer_loss", loss)
    return self.out(jax.lax.stop_gradient(ty), x)



# ----------------------------------------------------------------------------------------
# the projections every mixer shares with the softmax teacher
# ----------------------------------------------------------------------------------------

class QKVO(nnx.Module):
  """q/k/v/o projections laid out like the Llama's softmax attention (HF names)."""

  def __init__(self, config, layer_idx, *, rngs, mode="chunk"):
    hidden, H, Hkv, D = head_dims(config)
    self.config = config
    self.layer_idx = layer_idx
    self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size = H, Hkv, D, hidden
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    self.mode = mode
    from linjax.layers.mlp import dense
    jd = lambda d: jnp.dtype(d) if d is not None else None
    kw = dict(use_bias=bool(_cfg(config, "attention_bias", False)),
              dtype=jd(_cfg(config, "dtype", None)),
              param_dtype=jd(_cfg(config, "param_dtype", "float32")), rngs=rngs,
              std=float(_cfg(config, "initializer_range", 0.02)))
    self.q_proj = dense(hidden, H * D, ("embed", "heads"), **kw)
    self.k_proj = dense(hidden, Hkv * D, ("embed", "kv_heads"), **kw)
    self.v_proj = dense(hidden, Hkv * D, ("embed", "kv_heads"), **kw)
    self.o_proj = dense(H * D, hidden, ("heads", "embed"), **kw)

  def project(self, x):
    B, T, _ = x.shape
    q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    return q, k, v

  def out(self, o, x):
    B, T = o.shape[:2]
    return self.o_proj(o.reshape(B, T, -1).astype(x.dtype))


# ----------------------------------------------------------------------------------------
# the linear family
# ----------------------------------------------------------------------------------------

class LinearMixerBase(QKVO):
  """Subclasses define `features(x, positions) -> (q~, k~, v, g, beta)` (k, v per query head)."""

  normalize = "denominator"   # "denominator" | "groupnorm" | "rmsnorm" | None
  delta = False
  eps = 1e-6

  # --- subclass hooks -------------------------------------------------------------------
  def features(self, x, positions):
    raise NotImplementedError

  @property
  def scale(self):
    return 1.0 if self.normalize == "denominator" else self.feat_dim ** -0.5

  def post(self, o):
    """o [B, T, H, V(+1)] f32 -> normalized [B, T, H, V]."""
    if self.normalize == "denominator":
      return o[..., :-1] / (o[..., -1:] + self.eps)
    if self.normalize == "groupnorm":
      return group_norm(o)
    if self.normalize == "rmsnorm":
      o = o * jax.lax.rsqrt((o * o).mean(-1, keepdims=True) + 1e-5)
      return o * self.o_norm[...].astype(jnp.float32)
    return o

  # --- the three modes ------------------------------------------------------------------
  def _values(self, v):
    v = v.astype(jnp.float32)
    if self.normalize == "denominator":
      v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], -1)
    return v

  def attention_weights(self, x, *, positions, segment_ids=None):
    """Normalized T x T weights [B, H, T, T] of the non-delta mixers (for Hedgehog-style
    distillation); None for the delta rule and per-channel gates."""
    qf, kf, _, g, beta = self.features(x, positions)
    if beta is not None or (g is not None and g.ndim == 4):
      return None
    _, a = quadratic_gla(qf, kf, jnp.zeros(qf.shape[:3] + (1,)), g, scale=self.scale,
                         vis=segment_masks(positions, segment_ids))
    if self.normalize == "denominator":
      a = a / (a.sum(-1, keepdims=True) + self.eps)
    return a

  def heads(self, x, *, positions, segment_ids=None, cache=None):
    """Per-head outputs before o_proj ([B, T, H, V] f32) and the new cache."""
    qf, kf, v, g, beta = self.features(x, positions)
    v = self._values(v)
    B, T = x.shape[:2]
    if cache is not None:
      upd = jnp.ones((B, T), bool) if segment_ids is None else segment_ids > 0
      keep = upd[:, :, None, None]
      kf = jnp.where(keep, kf, 0.0)
      g = None if g is None else jnp.where(keep if g.ndim == 4 else upd[:, :, None], g, 0.0)
      if self.mode == "recurrent" or (T == 1):
        o, S = recurrent_scan(qf, kf, v, g, beta, scale=self.scale,
                              initial_state=cache["state"], update=upd)
      elif self.delta:
        o, S = call_op("delta_rule", qf, kf, v, jnp.where(upd[:, :, None], beta, 0.0), g,
                       scale=self.scale, initial_state=cache["state"], output_final_state=True)
      else:
        o, S = call_op("gla", qf, kf, v, g, scale=self.scale, initial_state=cache["state"],
                       output_final_state=True)
      return self.post(o.astype(jnp.float32)), {"state": S.astype(jnp.float32)}

    mode = self.mode
    quad_ok = beta is None and (g is None or g.ndim == 3)
    if mode == "quadratic" and not quad_ok:
      mode = "recurrent"
    if mode == "quadratic":
      o, _ = quadratic_gla(qf, kf, v, g, scale=self.scale, vis=segment_masks(positions, segment_ids))
    elif mode == "recurrent":
      reset = None
      if segment_ids is not None:
        reset = jnp.concatenate([jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
      o, _ = recurrent_scan(qf, kf, v, g, beta, scale=self.scale, reset=reset)
    elif self.delta:  # packed rows reset the state per segment inside the op (and LASP-2)
      o, _ = call_op("delta_rule", qf, kf, v, beta, g, scale=self.scale, segment_ids=segment_ids)
    else:
      o, _ = call_op("gla", qf, kf, v, g, scale=self.scale, segment_ids=segment_ids)
    return self.post(o.astype(jnp.float32)), None

  def __call__(self, x, *, positions, segment_ids=None, cache=None):
    o, cache = self.heads(x, positions=positions, segment_ids=segment_ids, cache=cache)
    return self.out(o, x), cache

  def init_cache(self, batch_size, max_len=None, dtype=jnp.float32):
    V = self.head_dim + (1 if self.normalize == "denominator" else 0)
    return {"state": jnp.zeros((batch_size, self.num_heads, self.feat_dim, V), jnp.float32)}


@register_mixer("linear")
class LinearAttention(DistillMixin, LinearMixerBase):
  """phi(q) [sum_s phi(k_s)^T v_s] / phi(q) . sum_s phi(k_s) with any feature map.

  kwargs: feature_map (see `linjax.layers.feature_maps.KINDS`, default "hedgehog"),
  normalize ("denominator" | "groupnorm" | None), rotary ("before" the map | "after" | "none"),
  tie_qk (one map for q and k), decay (None | "retnet" | "alibi" | "lightning"), mode.
  """
  def __init__(self, config, layer_idx, *, rngs, feature_map="hedgehog", normalize="denominator",
               rotary="before", tie_qk=False, decay=None, mode="chunk"):
    super().__init__(config, layer_idx, rngs=rngs, mode=mode)
    self.normalize = normalize
    self.rotary = rotary
    if rotary == "after" and feature_map in ("hedgehog", "dpfp", "softmax", "t2r", "relu", "elu"):
      raise ValueError("rotary='after' needs a feature map that keeps the head dim layout "
                       "(identity / l2 / silu_l2) or a SUPRA map")
    self.feature_map_q = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feature_map_k = self.feature_map_q if tie_qk else FeatureMap(
        feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feat_dim = feature_dim(feature_map, self.head_dim)
    self.decay = decay
    if decay is not None:
      self.log_decay = tuple(float(a) for a in decay_log(
          decay, self.num_heads, layer_idx, _cfg(config, "num_hidden_layers", 1)))

  # --- attention transfer (Hedgehog / LoLCATs-style distillation of the feature maps) ---
  def student_params(self):
    fm = lambda m: (None if m.weight is None else m.weight[...],
                    None if m.bias is None else m.bias[...])
    return (fm(self.feature_map_q), fm(self.feature_map_k), None)

  def student_quadratic(self, params, q, k, v, positions, vis):
    """q, k rotary'd (k per query head). Returns (y [B,T,H,V], normalized weights [B,H,T,T])."""
    if self.rotary != "before":
      raise NotImplementedError("attention transfer needs rotary='before'")
    (wq, bq), (wk, bk), _ = params
    fq = feature_map_fn(self.feature_map_q.kind, q, wq, bq)
    fk = feature_map_fn(self.feature_map_k.kind, k, wk, bk)
    g = None if self.decay is None else jnp.broadcast_to(
        jnp.asarray(self.log_decay, jnp.float32), fq.shape[:3])
    _, a = quadratic_gla(fq, fk, jnp.zeros(fq.shape[:3] + (1,)), g, scale=self.scale, vis=vis)
    if self.normalize == "denominator":
      a = a / (a.sum(-1, keepdims=True) + self.eps)
      return jnp.einsum("bhij,bjhv->bihv", a, v.astype(jnp.float32)), a
    y = jnp.einsum("bhij,bjhv->bihv", a, v.astype(jnp.float32))
    return self.post(y), a

  def __call__(self, x, *, positions, segment_ids=None, cache=None):
    if self.distill and cache is None:
      return self._distill_call(x, positions, segment_ids), None
    return super().__call__(x, positions=positions, segment_ids=segment_ids, cache=cache)

  def features(self, x, positions):
    q, k, v = self.project(x)
    rep = self.num_heads // self.num_kv_heads
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    if self.rotary == "before":
      q, k = rotary(q, positions, self.config), rotary(k, positions, self.config)
    qf, kf = self.feature_map_q(q), self.feature_map_k(k)
    if self.rotary == "after":
      qf, kf = rotary(qf, positions, self.config), rotary(kf, positions, self.config)
    g = None
    if self.decay is not None:
      g = jnp.broadcast_to(jnp.asarray(self.log_decay, jnp.float32), qf.shape[:3])
    return qf, kf, v, g, None


@register_mixer("retention")
class Retention(LinearAttention):
  """RetNet retention: fixed per-head decay 1 - 2^(-5-h), identity map, GroupNorm output."""
  def __init__(self, config, layer_idx, *, rngs, feature_map="identity", normalize="groupnorm",
               decay="retnet", rotary="before", mode="chunk", **kw):
    super().__init__(config, layer_idx, rngs=rngs, feature_map=feature_map, normalize=normalize,
                     decay=decay, rotary=rotary, mode=mode, **kw)


@register_mixer("lightning")
class Lightning(LinearAttention):
  """Lightning attention: ALiBi-slope decays shrinking with depth (TransNormerLLM)."""
  def __init__(self, config, layer_idx, *, rngs, feature_map="identity", normalize="groupnorm",
               decay="lightning", rotary="before", mode="chunk", **kw):
    super().__init__(config, layer_idx, rngs=rngs, feature_map=feature_map, normalize=normalize,
                     decay=decay, rotary=rotary, mode=mode, **kw)


@register_mixer("gla")
class GLA(LinearAttention):
  """GLA: per-key-channel data-dependent decay g = logsigmoid(W2 W1 x + b) / normalizer.

  The low-rank gate projection (rank 16, like fla) is new: `FeatureMapParam`s. The bias
  starts at `gate_bias_init` so the initial memory is long.
  """
  def __init__(self, config, layer_idx, *, rngs, feature_map="identity", normalize="groupnorm",
               gate_logit_normalizer=16.0, gate_low_rank_dim=16, gate_bias_init=4.0,
               rotary="before", mode="chunk", **kw):
    super().__init__(config, layer_idx, rngs=rngs, feature_map=feature_map, normalize=normalize,
                     rotary=rotary, mode=mode, **kw)
    self.gate_logit_normalizer = float(gate_logit_normalizer)
    F = self.feat_dim
    key = rngs.params()
    k1, k2 = jax.random.split(key)
    r = gate_low_rank_dim
    self.gk_w1 = FeatureMapParam(jax.random.normal(k1, (self.hidden_size, r)) * self.hidden_size ** -0.5)
    self.gk_w2 = FeatureMapParam(jax.random.normal(k2, (r, self.num_heads * F)) * r ** -0.5 * 0.1)
    self.gk_b = FeatureMapParam(jnp.full((self.num_heads * F,), gate_bias_init, jnp.float32))

  def gates(self, x):
    B, T, _ = x.shape
    z = (x.astype(jnp.float32) @ self.gk_w1[...]) @ self.gk_w2[...] + self.gk_b[...]
    return jax.nn.log_sigmoid(z).reshape(B, T, self.num_heads, self.feat_dim) / self.gate_logit_normalizer

  def features(self, x, positions):
    qf, kf, v, _, _ = super().features(x, positions)
    return qf, kf, v, self.gates(x), None


@register_mixer("deltanet")
class DeltaNet(LinearMixerBase):
  """DeltaNet: q, k = l2norm(silu(.)), beta = sigmoid(b_proj x) (x2 with allow_neg_eigval),
  per-head RMSNorm on the output. Gated (`gated=True`): g = -exp(A_log) softplus(a_proj x + dt_bias).
  """
  delta = True

  def __init__(self, config, layer_idx, *, rngs, feature_map="silu_l2", allow_neg_eigval=False,
               gated=False, rotary="before", normalize="rmsnorm", mode="chunk"):
    super().__init__(config, layer_idx, rngs=rngs, mode=mode)
    self.normalize = normalize
    self.rotary = rotary
    self.allow_neg_eigval = allow_neg_eigval
    self.gated = gated
    self.feature_map_q = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feature_map_k = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feat_dim = feature_dim(feature_map, self.head_dim)
    H, hidden = self.num_heads, self.hidden_size
    k1, k2 = jax.random.split(rngs.params())
    self.b_w = FeatureMapParam(jax.random.normal(k1, (hidden, H)) * hidden ** -0.5)
    self.b_b = FeatureMapParam(jnp.zeros((H,), jnp.float32))
    if gated:
      self.a_w = FeatureMapParam(jax.random.normal(k2, (hidden, H)) * hidden ** -0.5)
      # Mamba2-style: A in [1, 16], dt in [1e-3, 1e-1] spread over heads.
      self.A_log = FeatureMapParam(jnp.log(jnp.linspace(1.0, 16.0, H)))
      dt = jnp.exp(jnp.linspace(math.log(1e-3), math.log(1e-1), H))
      self.dt_bias = FeatureMapParam(dt + jnp.log(-jnp.expm1(-dt)))
    if normalize == "rmsnorm":
      self.o_norm = FeatureMapParam(jnp.ones((self.head_dim,), jnp.float32))

  @property
  def scale(self):
    return self.feat_dim ** -0.5

  def features(self, x, positions):
    q, k, v = self.project(x)
    rep = self.num_heads // self.num_kv_heads
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    if self.rotary == "before":
      q, k = rotary(q, positions, self.config), rotary(k, positions, self.config)
    qf, kf = self.feature_map_q(q), self.feature_map_k(k)
    xf = x.astype(jnp.float32)
    beta = jax.nn.sigmoid(xf @ self.b_w[...] + self.b_b[...])
    if self.allow_neg_eigval:
      beta = 2.0 * beta
    g = None
    if self.gated:
      g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(xf @ self.a_w[...] + self.dt_bias[...])
    return qf, kf, v, g, beta


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
  def __init__(self, config, layer_idx, *, rngs, **kw):
    kw.setdefault("gated", True)
    super().__init__(config, layer_idx, rngs=rngs, **kw)


@register_mixer("supra")
class Supra(LinearMixerBase):
  """SUPRA: phi(x) = rotary(ReLU(W x + b)), W over the concatenated heads (one W shared by q and
  k under MHA, one each under GQA; W = I, b = 0 at init), a fixed per-head decay, GroupNorm over
  each head's output instead of the softmax denominator.
  """
  normalize = "groupnorm"

  def __init__(self, config, layer_idx, *, rngs, decay="alibi", mode="chunk"):
    super().__init__(config, layer_idx, rngs=rngs, mode=mode)
    H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
    self.feat_dim = D
    self.tied = H == Hkv
    self.phi_q_w = FeatureMapParam(jnp.eye(H * D, dtype=jnp.float32))
    self.phi_q_b = FeatureMapParam(jnp.zeros((H * D,), jnp.float32))
    if not self.tied:
      self.phi_k_w = FeatureMapParam(jnp.eye(Hkv * D, dtype=jnp.float32))
      self.phi_k_b = FeatureMapParam(jnp.zeros((Hkv * D,), jnp.float32))
    self.decay = decay
    self.log_decay = tuple(float(a) for a in decay_log(
        decay, H, layer_idx, _cfg(config, "num_hidden_layers", 1)))

  def features(self, x, positions):
    q, k, v = self.project(x)
    B, T = x.shape[:2]
    H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
    qf = jax.nn.relu(q.reshape(B, T, H * D).astype(jnp.float32) @ self.phi_q_w[...] + self.phi_q_b[...])
    wk, bk = (self.phi_q_w, self.phi_q_b) if self.tied else (self.phi_k_w, self.phi_k_b)
    kf = jax.nn.relu(k.reshape(B, T, Hkv * D).astype(jnp.float32) @ wk[...] + bk[...])
    qf = rotary(qf.reshape(B, T, H, D), positions, self.config)
    kf = rotary(kf.reshape(B, T, Hkv, D), positions, self.config)
    rep = H // Hkv
    kf, v = repeat_kv(kf, rep), repeat_kv(v, rep)
    return qf, kf, v, jnp.broadcast_to(jnp.asarray(self.log_decay, jnp.float32), (B, T, H)), None
