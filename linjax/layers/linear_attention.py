"""Linear attention with any feature map, and its fixed-decay forms (RetNet, Lightning).

Every linear mixer keeps the teacher's `q_proj`, `k_proj`, `v_proj`, `o_proj`, adds only
`FeatureMapParam`s, and runs one of the ops' recurrences

    S_t = exp(g_t) * S_{t-1} + phi(k_t)^T v_t           (linear / retention / GLA / SUPRA)
    S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t^T v_t      (DeltaNet, gated DeltaNet)
    o_t = scale * phi(q_t) S_t

through `linjax.parallel.sequence` (LASP-2 under a `seq` mesh, else `linjax.ops`) with the
mixer's `method`. Decoding keeps an O(1) state per layer, `{"state": [B, H, F, V(+1)] f32}`;
a T-token prompt runs the op once from the cached state (prefill), one token runs the op's
step function. The normalising denominator phi(q_t) . sum_s phi(k_s) rides along as an extra
all-ones value column, so it is part of the same state and the same op call. Tokens with
segment id 0 in a cached call are padding: they leave the state untouched.

GQA: k and v are repeated to the query heads before the feature map (as LoLCATs and Liger
do), so every recurrent state is per query head.

Registered here: "linear", "retention", "lightning".
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from linjax import ops
from linjax.ops._common import masked_exp
from linjax.layers.base import QKVO, repeat_kv, segment_masks, token_mask
from linjax.layers.distill import DistillMixin
from linjax.layers.feature_maps import FeatureMap, feature_dim
from linjax.layers.mixers import register_mixer
from linjax.parallel import sequence as sp

NORMALIZE = ("denominator", "groupnorm", "rmsnorm", None)


def gla_weights(q, k, g, *, scale, vis):
  """Masked, decayed weights scale * exp(G_i - G_j) (q_i . k_j) [B, H, T, T] f32 (g None or
  [B, T, H]): the quadratic form whose rows the linear mixers' outputs are."""
  s = jnp.einsum("bihf,bjhf->bhij", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  vis = vis[:, None]
  if g is not None:
    G = jnp.cumsum(g.astype(jnp.float32), axis=1).transpose(0, 2, 1)   # [B, H, T]
    s = s * masked_exp(G[:, :, :, None] - G[:, :, None, :], vis)
  return jnp.where(vis, s, 0.0)


def alibi_slopes(n):
  def pow2(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  if math.log2(n).is_integer():
    return pow2(n)
  c = 2 ** math.floor(math.log2(n))
  return pow2(c) + alibi_slopes(2 * c)[0::2][: n - c]


def decay_log(kind, num_heads, layer_idx=0, num_layers=1):
  """Per-head log decay (<= 0) [H] for the fixed-decay mixers (numpy: a build-time constant,
  so the mixers also build under `nnx.eval_shape`)."""
  if kind == "retnet":
    return np.log(1.0 - 2.0 ** (-5.0 - np.arange(num_heads, dtype=np.float32)))
  slopes = np.asarray(alibi_slopes(num_heads), np.float32)
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


class LinearMixerBase(DistillMixin, QKVO):
  """Subclasses define `features(x, positions) -> (q~, k~, v, g, beta)` (k, v per query head)
  and set `feat_dim`."""

  normalize = "denominator"
  delta = False
  eps = 1e-6

  def features(self, x, positions):
    raise NotImplementedError

  def mapped_qkv(self, x, positions):
    """(q~, k~, v): projected, k / v repeated per query head, rotary applied before or after
    the feature maps `feature_map_q` / `feature_map_k` as `self.rotary` says."""
    q, k, v = self.project(x)
    k, v = repeat_kv(k, self.rep), repeat_kv(v, self.rep)
    if self.rotary == "before":
      q, k = self.rotate(q, positions), self.rotate(k, positions)
    qf, kf = self.feature_map_q(q), self.feature_map_k(k)
    if self.rotary == "after":
      qf, kf = self.rotate(qf, positions), self.rotate(kf, positions)
    return qf, kf, v

  @property
  def scale(self):
    return 1.0 if self.normalize == "denominator" else self.feat_dim ** -0.5

  def post(self, o):
    """o [B, T, H, V(+1)] f32 -> normalized [B, T, H, V]."""
    if self.normalize == "denominator":
      return o[..., :-1] / (o[..., -1:] + self.eps)
    if self.normalize == "groupnorm":
      o = group_norm(o)
      if getattr(self, "norm_scale", None) is not None:   # a per-head affine (SUPRA option)
        o = o * self.norm_scale[...] + self.norm_bias[...]
      return o
    if self.normalize == "rmsnorm":
      o = o * jax.lax.rsqrt((o * o).mean(-1, keepdims=True) + 1e-5)
      return o * self.o_norm[...].astype(jnp.float32)
    return o

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
    a = gla_weights(qf, kf, g, scale=self.scale, vis=segment_masks(positions, segment_ids))
    if self.normalize == "denominator":
      a = a / (a.sum(-1, keepdims=True) + self.eps)
    return a

  def _run(self, qf, kf, v, g, beta, **kw):
    if self.delta:
      return sp.delta_rule(qf, kf, v, beta, g, scale=self.scale, **kw)
    return sp.gla(qf, kf, v, g, scale=self.scale, **kw)

  def heads(self, x, *, positions, segment_ids=None, cache=None):
    """Per-head outputs before o_proj ([B, T, H, V] f32) and the new cache."""
    qf, kf, v, g, beta = self.features(x, positions)
    v = self._values(v)
    if cache is None:   # packed rows reset the state per segment inside the op (and LASP-2)
      o, _ = self._run(qf, kf, v, g, beta, segment_ids=segment_ids, method=self.method)
      return self.post(o.astype(jnp.float32)), None
    upd = token_mask(x, segment_ids)                # padding leaves the state untouched
    kf = jnp.where(upd[:, :, None, None], kf, 0.0)
    if g is not None:
      g = jnp.where(upd[:, :, None, None] if g.ndim == 4 else upd[:, :, None], g, 0.0)
    if beta is not None:
      beta = jnp.where(upd[:, :, None], beta, 0.0)
    if x.shape[1] == 1:                              # decode: the op's step function
      args = (cache["state"], qf, kf, v) + ((beta, g) if self.delta else (g,))
      step = ops.delta_rule_step if self.delta else ops.gla_step
      o, S = step(*args, scale=self.scale)
    else:                                            # prefill: the op once, from the state
      o, S = self._run(qf, kf, v, g, beta, initial_state=cache["state"],
                       output_final_state=True, method=self.method)
    return self.post(o.astype(jnp.float32)), {"state": S.astype(jnp.float32)}

  def init_cache(self, batch_size, max_len=None, dtype=jnp.float32):
    V = self.head_dim + (1 if self.normalize == "denominator" else 0)
    return {"state": jnp.zeros((batch_size, self.num_heads, self.feat_dim, V), jnp.float32)}


@register_mixer("linear")
class LinearAttention(LinearMixerBase):
  """phi(q) [sum_s phi(k_s)^T v_s] / phi(q) . sum_s phi(k_s) with any feature map.

  kwargs: feature_map (one of `linjax.ops.feature_maps.KINDS`, default "hedgehog"),
  normalize ("denominator" | "groupnorm" | None), rotary ("before" the map | "after" |
  "none"), tie_qk (one map for q and k), decay (None | "retnet" | "alibi" | "lightning"),
  method.
  """

  def __init__(self, config, layer_idx, *, rngs, feature_map="hedgehog", normalize="denominator",
               rotary="before", tie_qk=False, decay=None, method="auto"):
    super().__init__(config, rngs=rngs, method=method)
    if normalize not in NORMALIZE:
      raise ValueError(f"`normalize` must be one of {NORMALIZE}, got {normalize!r}")
    if rotary not in ("before", "after", "none"):
      raise ValueError(f"`rotary` must be 'before', 'after' or 'none', got {rotary!r}")
    self.normalize = normalize
    self.rotary = rotary
    if rotary == "after" and feature_map not in ("identity", "l2", "silu_l2"):
      raise ValueError("rotary='after' needs a feature map that keeps the head dim layout and "
                       f"sign (identity / l2 / silu_l2), got {feature_map!r}; SUPRA's "
                       "rotary(ReLU(.)) is the 'supra' mixer")
    self.feature_map_q = FeatureMap(feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feature_map_k = self.feature_map_q if tie_qk else FeatureMap(
        feature_map, self.num_heads, self.head_dim, rngs=rngs)
    self.feat_dim = feature_dim(feature_map, self.head_dim)
    self.decay = decay
    if decay is not None:
      self.log_decay = tuple(float(a) for a in decay_log(
          decay, self.num_heads, layer_idx, config.num_hidden_layers))

  def _gates(self, shape):
    if self.decay is None:
      return None
    return jnp.broadcast_to(jnp.asarray(self.log_decay, jnp.float32), shape)

  # --- attention transfer (Hedgehog / LoLCATs-style distillation of the feature maps) ---
  def student_params(self):
    return (self.feature_map_q.params(), self.feature_map_k.params(), None)

  def student_quadratic(self, params, q, k, v, positions, vis):
    """q, k rotary'd (k per query head). Returns (y [B,T,H,V], normalized weights [B,H,T,T])."""
    if self.rotary != "before":
      raise NotImplementedError("attention transfer needs rotary='before'")
    fq = self.feature_map_q.apply_with(params[0], q)
    fk = self.feature_map_k.apply_with(params[1], k)
    a = gla_weights(fq, fk, self._gates(fq.shape[:3]), scale=self.scale, vis=vis)
    if self.normalize == "denominator":
      a = a / (a.sum(-1, keepdims=True) + self.eps)
      return jnp.einsum("bhij,bjhv->bihv", a, v.astype(jnp.float32)), a
    y = jnp.einsum("bhij,bjhv->bihv", a, v.astype(jnp.float32))
    return self.post(y), a

  def features(self, x, positions):
    qf, kf, v = self.mapped_qkv(x, positions)
    return qf, kf, v, self._gates(qf.shape[:3]), None


@register_mixer("retention")
class Retention(LinearAttention):
  """RetNet retention: fixed per-head decay 1 - 2^(-5-h), identity map, GroupNorm output."""

  def __init__(self, config, layer_idx, *, rngs, feature_map="identity", normalize="groupnorm",
               decay="retnet", rotary="before", method="auto", **kw):
    super().__init__(config, layer_idx, rngs=rngs, feature_map=feature_map, normalize=normalize,
                     decay=decay, rotary=rotary, method=method, **kw)


@register_mixer("lightning")
class Lightning(LinearAttention):
  """Lightning attention: ALiBi-slope decays shrinking with depth (TransNormerLLM)."""

  def __init__(self, config, layer_idx, *, rngs, feature_map="identity", normalize="groupnorm",
               decay="lightning", rotary="before", method="auto", **kw):
    super().__init__(config, layer_idx, rngs=rngs, feature_map=feature_map, normalize=normalize,
                     decay=decay, rotary=rotary, method=method, **kw)
