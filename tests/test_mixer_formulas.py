"""Every mixer against an independent transcription of its published formula.

Each reference below is numpy float64, token by token, written from the paper and the peer
code, not from linjax: only the weights are read from the linjax module (its q/k/v/o
projections and its own new parameters); rotary, the feature maps, gates, normalisation,
GQA repeat and the recurrence are re-implemented here. Sources, per mixer:

  linear      Katharopoulos et al. 2020 (elu + 1, the normalised causal sum); feature maps:
              DPFP (Schlag et al. 2021: r = [relu x, relu -x], r * roll(r, j)), T2R (Kasai et
              al. 2021: relu(x W + b)), Hedgehog as LoLCATs ships it (src/model/feature_map.py
              `SoftmaxDim`: [softmax(xW), softmax(-xW)] each over its half, clamp 1e-12), the
              Liger softmax map, DeltaNet's silu + l2 norm (fla `l2norm`, eps 1e-6 under the
              root); the denominator's eps is LoLCATs' (1e-12).
  retention   RetNet (Sun et al. 2023; fla multiscale_retention): gamma_h = 1 - 2^(-5-h),
              scale K^-1/2, GroupNorm per head (no affine: linjax adds no parameters, so no
              RetNet swish output gate either).
  lightning   TransNormerLLM / MiniMax: ALiBi slopes times (1 - l / (L - 1) + 1e-5) for layer l;
              the q/k map and the norm are linjax's (identity, GroupNorm): TransNormerLLM itself
              uses silu q/k and an RMSNorm, so only the decay schedule is the paper's.
  gla         Yang et al. 2024 / fla layers/gla.py: g = logsigmoid(W2 W1 x + b) / 16 per key
              channel, S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, o = q S / sqrt(K); norm GroupNorm
              (no fla output gate).
  deltanet    Yang et al. 2024 / fla layers/delta_net.py: q, k = l2norm(silu(.)), beta =
              sigmoid(x W_b + b_b) (x2 with negative eigenvalues), S_t = S_{t-1} + beta_t k_t^T
              (v_t - k_t S_{t-1}), o = q S / sqrt(K), RMSNorm (eps 1e-5) with a learned scale
              (no short convolutions, no silu on v: linjax keeps the teacher's values).
  gated_deltanet  fla layers/gated_deltanet.py: g = -exp(A_log) softplus(x W_a + dt_bias),
              S_t = exp(g_t)(I - beta k k^T) S_{t-1} + beta k^T v.
  supra       Mercat et al. 2024 / TRI-ML linear_open_lm `LinearAttn`: phi = relu(x W + b) over
              the concatenated heads (shared by q and k under MHA), rotary after it, keys scaled
              by K^-1/2, decay exp(-slope_h) with the lightning-attention ALiBi slopes,
              nn.GroupNorm(H groups, affine=False, eps 1e-5) in place of the denominator.
  lolcats     Zhang et al. 2024 / HazyResearch lolcats `hybrid_attention_quadratic`
              (linear_window_attention_sw.py / _tk.py): window softmax terms
              w_h exp(q k / sqrt(D) - max over the window) (w_h = sigmoid(window_factors)),
              linear terms phi(q) . phi(k) under the window, one shared denominator; sw window:
              i - W < j <= i; tk: keys in the query's block of W or the block before. LoLCATs'
              quadratic code aligns tk blocks with the end of the sequence (it crops a
              ceil(T / W) W mask from the top-left); linjax aligns them with position 0, which
              is the same for T a multiple of W (tested here) and is what decoding needs.
              Attention sinks and `linear_factors` are linjax options (their definitions from
              the linjax docstring: sinks are window keys; l_h = max(param, 0) scales the
              linear terms).
  liger       Lan et al. 2025 / OpenSparseLLMs Linearization `LigerGatedLinearAttention`:
              g = logsigmoid(avgpool(k)) / 16 per key channel (pool to Hkv * D: the identity),
              softmax q and k maps before rotary, GLA with scale 1 unnormalised, plus softmax
              attention over a window of W keys (i - W < j <= i: transformers >= 4.49 passes
              flash-attn window (W - 1, W - 1); older versions gave W + 1 keys) on rotary q, k,
              y = 0.5 window + 0.5 GLA.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linjax.layers.mixers import get_mixer
from linjax.layers.params import FeatureMapParam
from tests.helpers import rel_err
from tests.test_mixers import tiny_config

F64 = np.float64
# float32 vs float64 gives ~3e-7; the feature maps normalised by the denominator sit at
# ~1e-5, linjax's denominator eps (1e-6) against LoLCATs' (1e-12) on denominators ~1/16
TOL = 2e-5


# ----------------------------------------------------------------------------- shared pieces

def arr(p):
  return np.asarray(jax.device_get(p[...]), F64)


def linear(x, lin):
  y = x @ arr(lin.kernel)
  return y + arr(lin.bias) if getattr(lin, "bias", None) is not None else y


def rotary(x, pos, theta):
  """HF rotate_half rotary: x [B, T, H, D] at integer positions [B, T]."""
  D = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=F64) / D)
  ang = pos[..., None].astype(F64) * inv
  cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None, :]
  sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None, :]
  rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
  return x * cos + rot * sin


def repeat_heads(x, rep):
  """GQA: kv head j serves query heads j * rep .. j * rep + rep - 1 (HF repeat_kv)."""
  return np.repeat(x, rep, axis=2)


def softmax(z, axis=-1):
  z = z - z.max(axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis, keepdims=True)


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def logsigmoid(z):
  return -np.logaddexp(0.0, -z)


def softplus(z):
  return np.logaddexp(0.0, z)


def silu(z):
  return z * sigmoid(z)


def l2norm(z, eps=1e-6):
  return z / np.sqrt((z * z).sum(-1, keepdims=True) + eps)


def group_norm(o, eps=1e-5):
  mu = o.mean(-1, keepdims=True)
  return (o - mu) / np.sqrt(((o - mu) ** 2).mean(-1, keepdims=True) + eps)


def alibi_slopes(n):
  """Press et al. 2022 (ALiBi), as the lightning-attention / SUPRA code computes them."""
  def pow2(n):
    ratio = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [ratio * ratio ** i for i in range(n)]
  if math.log2(n).is_integer():
    return pow2(n)
  c = 2 ** math.floor(math.log2(n))
  return pow2(c) + alibi_slopes(2 * c)[0::2][: n - c]


def qkv(m, x):
  """The teacher's projections, per head: q [B,T,H,D], k, v [B,T,Hkv,D]."""
  B, T, _ = x.shape
  H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
  return (linear(x, m.q_proj).reshape(B, T, H, D), linear(x, m.k_proj).reshape(B, T, Hkv, D),
          linear(x, m.v_proj).reshape(B, T, Hkv, D))


def out_proj(m, o):
  B, T = o.shape[:2]
  return linear(o.reshape(B, T, -1), m.o_proj)


def feature_map(kind, x, fmap):
  """phi(x) for x [B, T, H, D], the learned weights read from a linjax FeatureMap."""
  if kind == "identity":
    return x
  if kind == "elu":
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
  if kind == "relu":
    return np.maximum(x, 0.0)
  if kind == "softmax":
    return softmax(x)
  if kind == "silu_l2":
    return l2norm(silu(x))
  if kind == "l2":
    return l2norm(x)
  if kind == "dpfp":      # nu = 1
    r = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], -1)
    return r * np.roll(r, 1, axis=-1)
  W = arr(fmap.weight)                                   # [H, D, F]
  z = np.einsum("bthd,hdf->bthf", x, W)
  if kind == "t2r":
    return np.maximum(z + arr(fmap.bias), 0.0)
  if kind == "hedgehog":
    return np.maximum(np.concatenate([softmax(z), softmax(-z)], -1), 1e-12)
  raise ValueError(kind)


def recurrence(q, k, v, *, decay=None, beta=None, delta_gate=None, scale=1.0, init=None):
    """Token by token. q, k [B,T,H,K]; v [B,T,H,V]; decay: per-key-channel log gates
    [B,T,H,K] (or None); beta [B,T,H] for the delta rule, delta_gate [B,T,H] its log decay.
    Returns o [B,T,H,V] = scale q_t S_t."""
    B, T, H, K = q.shape
    S = np.zeros((B, H, K, v.shape[-1])) if init is None else init.copy()
    out = np.zeros((B, T, H, v.shape[-1]))
    for t in range(T):
      if beta is None:
        if decay is not None:
          S = np.exp(decay[:, t])[..., None] * S
        S = S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
      else:
        if delta_gate is not None:
          S = np.exp(delta_gate[:, t])[:, :, None, None] * S
        u = v[:, t] - np.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + beta[:, t][:, :, None, None] * np.einsum("bhk,bhv->bhkv", k[:, t], u)
      out[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return out


# ----------------------------------------------------------------------------- references

def ref_linear(m, x, pos, kind, normalize, rotary_at, decay_kind, theta):
  q, k, v = qkv(m, x)
  k, v = repeat_heads(k, m.rep), repeat_heads(v, m.rep)
  if rotary_at == "before":
    q, k = rotary(q, pos, theta), rotary(k, pos, theta)
  fq, fk = feature_map(kind, q, m.feature_map_q), feature_map(kind, k, m.feature_map_k)
  if rotary_at == "after":
    fq, fk = rotary(fq, pos, theta), rotary(fk, pos, theta)
  B, T, H, F = fq.shape
  g = None
  if decay_kind is not None:
    g = np.broadcast_to(np.asarray(decay_kind, F64)[None, None, :, None], (B, T, H, F))
  if normalize == "denominator":
    num = recurrence(fq, fk, v, decay=g)
    den = recurrence(fq, fk, np.ones(v.shape[:-1] + (1,)), decay=g)
    o = num / (den + 1e-12)
  else:
    o = recurrence(fq, fk, v, decay=g, scale=F ** -0.5)
    if normalize == "groupnorm":
      o = group_norm(o)
  return out_proj(m, o)


def retnet_log_gamma(H):
  return np.log(1.0 - 2.0 ** (-5.0 - np.arange(H)))


def lightning_log_gamma(H, layer, layers):
  return -np.asarray(alibi_slopes(H)) * (1 - layer / (layers - 1) + 1e-5)


def ref_gla(m, x, pos, theta):
  q, k, v = qkv(m, x)
  k, v = repeat_heads(k, m.rep), repeat_heads(v, m.rep)
  q, k = rotary(q, pos, theta), rotary(k, pos, theta)
  B, T, H, K = q.shape
  z = (x @ arr(m.gk_w1)) @ arr(m.gk_w2) + arr(m.gk_b)
  g = logsigmoid(z).reshape(B, T, H, K) / 16.0
  return out_proj(m, group_norm(recurrence(q, k, v, decay=g, scale=K ** -0.5)))


def ref_deltanet(m, x, pos, theta, neg_eig, gated):
  q, k, v = qkv(m, x)
  k, v = repeat_heads(k, m.rep), repeat_heads(v, m.rep)
  q, k = rotary(q, pos, theta), rotary(k, pos, theta)
  q, k = l2norm(silu(q)), l2norm(silu(k))
  beta = sigmoid(x @ arr(m.b_w) + arr(m.b_b)) * (2.0 if neg_eig else 1.0)
  g = None
  if gated:
    g = -np.exp(arr(m.A_log)) * softplus(x @ arr(m.a_w) + arr(m.dt_bias))
  o = recurrence(q, k, v, beta=beta, delta_gate=g, scale=q.shape[-1] ** -0.5)
  o = o / np.sqrt((o * o).mean(-1, keepdims=True) + 1e-5) * arr(m.o_norm)
  return out_proj(m, o)


def ref_supra(m, x, pos, theta):
  B, T, _ = x.shape
  H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
  q, k, v = qkv(m, x)
  qf = np.maximum(q.reshape(B, T, H * D) @ arr(m.phi_q_w) + arr(m.phi_q_b), 0)
  wk, bk = (m.phi_q_w, m.phi_q_b) if H == Hkv else (m.phi_k_w, m.phi_k_b)
  kf = np.maximum(k.reshape(B, T, Hkv * D) @ arr(wk) + arr(bk), 0)
  qf = rotary(qf.reshape(B, T, H, D), pos, theta)
  kf = repeat_heads(rotary(kf.reshape(B, T, Hkv, D), pos, theta), m.rep)
  v = repeat_heads(v, m.rep)
  slopes = np.asarray(alibi_slopes(H))
  g = np.broadcast_to(-slopes[None, None, :, None], qf.shape)
  o = recurrence(qf, kf * D ** -0.5, v, decay=g)
  return out_proj(m, group_norm(o))


def lolcats_masks(pos, W, variant, sinks):
  """[B, T, T] (window, linear) boolean masks, the peer code's tril masks by position."""
  qp, kp = pos[:, :, None], pos[:, None, :]
  causal = kp <= qp
  if variant == "sw":
    win = qp - kp < W
  else:
    win = kp // W >= qp // W - 1
  win = (win | (kp < sinks)) & causal
  return win, causal & ~win


def ref_lolcats(m, x, pos, theta, W, variant, sinks):
  q, k, v = qkv(m, x)
  q, k = rotary(q, pos, theta), rotary(k, pos, theta)
  k, v = repeat_heads(k, m.rep), repeat_heads(v, m.rep)
  fq = feature_map("hedgehog", q, m.feature_map_q)
  fk = feature_map("hedgehog", k, m.feature_map_k)
  wf = sigmoid(arr(m.window_factors))                                    # [H]
  lf = np.ones_like(wf)
  if getattr(m, "linear_factors", None) is not None:
    lf = np.maximum(arr(m.linear_factors), 0.0)
  win, lin = lolcats_masks(pos, W, variant, sinks)
  B, T, H, D = q.shape
  o = np.zeros(v.shape)
  for b in range(B):
    for i in range(T):
      for h in range(H):
        s = k[b, :, h] @ q[b, i, h] * D ** -0.5                          # [T]
        mx = s[win[b, i]].max()
        a_sm = np.where(win[b, i], wf[h] * np.exp(np.where(win[b, i], s - mx, 0.0)), 0.0)
        a_ln = np.where(lin[b, i], lf[h] * (fk[b, :, h] @ fq[b, i, h]), 0.0)
        a = a_sm + a_ln
        o[b, i, h] = a @ v[b, :, h] / a.sum()
  return out_proj(m, o)


def ref_liger(m, x, pos, theta, W, sinks):
  q, k, v = qkv(m, x)
  B, T, H, D = q.shape
  g = repeat_heads(logsigmoid(k) / 16.0, m.rep)                          # pooled k = k
  fq, fk = softmax(q), repeat_heads(softmax(k), m.rep)
  vr = repeat_heads(v, m.rep)
  o_lin = recurrence(fq, fk, vr, decay=g)
  qr, kr = rotary(q, pos, theta), repeat_heads(rotary(k, pos, theta), m.rep)
  o_sw = np.zeros(vr.shape)
  for b in range(B):
    for i in range(T):
      keys = (pos[b] <= pos[b, i]) & ((pos[b, i] - pos[b] < W) | (pos[b] < sinks))
      for h in range(H):
        s = kr[b, keys, h] @ qr[b, i, h] * D ** -0.5
        o_sw[b, i, h] = softmax(s) @ vr[b, keys, h]
  mix = 0.5 * np.ones(H)
  if getattr(m, "window_mix", None) is not None:
    mix = arr(m.window_mix)
  mix = mix[None, None, :, None]
  return out_proj(m, mix * o_sw + (1 - mix) * o_lin)


# ----------------------------------------------------------------------------- the cases

THETA = 1000.0     # tiny_config's rope_theta

CASES = {
    # linear attention with each feature map (positive maps normalised by the denominator;
    # sign-indefinite ones unnormalised)
    **{f"linear-{kind}": ("linear", dict(feature_map=kind),
                          lambda m, x, p, kind=kind: ref_linear(m, x, p, kind, "denominator",
                                                                "before", None, THETA))
       for kind in ("elu", "relu", "softmax", "dpfp", "t2r", "hedgehog")},
    **{f"linear-{kind}-unnormalized": ("linear", dict(feature_map=kind, normalize=None),
                                       lambda m, x, p, kind=kind: ref_linear(
                                           m, x, p, kind, None, "before", None, THETA))
       for kind in ("identity", "l2", "silu_l2")},
    "linear-identity-rotary_after": (
        "linear", dict(feature_map="identity", normalize=None, rotary="after"),
        lambda m, x, p: ref_linear(m, x, p, "identity", None, "after", None, THETA)),
    "linear-dpfp-tied": ("linear", dict(feature_map="dpfp", tie_qk=True),
                         lambda m, x, p: ref_linear(m, x, p, "dpfp", "denominator", "before",
                                                    None, THETA)),
    "linear-t2r-retnet-groupnorm": (
        "linear", dict(feature_map="t2r", decay="retnet", normalize="groupnorm"),
        lambda m, x, p: ref_linear(m, x, p, "t2r", "groupnorm", "before",
                                   retnet_log_gamma(HEADS), THETA)),
    "linear-hedgehog-alibi": (
        "linear", dict(feature_map="hedgehog", decay="alibi"),
        lambda m, x, p: ref_linear(m, x, p, "hedgehog", "denominator", "before",
                                   -np.asarray(alibi_slopes(HEADS)), THETA)),
    "retention": ("retention", {},
                  lambda m, x, p: ref_linear(m, x, p, "identity", "groupnorm", "before",
                                             retnet_log_gamma(HEADS), THETA)),
    "lightning": ("lightning", {},
                  lambda m, x, p: ref_linear(m, x, p, "identity", "groupnorm", "before",
                                             lightning_log_gamma(HEADS, 1, 4), THETA)),
    "gla": ("gla", {}, lambda m, x, p: ref_gla(m, x, p, THETA)),
    "deltanet": ("deltanet", {}, lambda m, x, p: ref_deltanet(m, x, p, THETA, False, False)),
    "deltanet-neg_eigval": ("deltanet", dict(allow_neg_eigval=True),
                            lambda m, x, p: ref_deltanet(m, x, p, THETA, True, False)),
    "gated_deltanet": ("gated_deltanet", {},
                       lambda m, x, p: ref_deltanet(m, x, p, THETA, False, True)),
    "supra": ("supra", {}, lambda m, x, p: ref_supra(m, x, p, THETA)),
    "supra-mha": ("supra", {}, lambda m, x, p: ref_supra(m, x, p, THETA)),   # q, k share W
    "lolcats-sw": ("lolcats", dict(window=8, variant="sw"),
                   lambda m, x, p: ref_lolcats(m, x, p, THETA, 8, "sw", 0)),
    "lolcats-tk": ("lolcats", dict(window=8, variant="tk"),
                   lambda m, x, p: ref_lolcats(m, x, p, THETA, 8, "tk", 0)),
    "lolcats-sw-sinks": ("lolcats", dict(window=8, variant="sw", num_sinks=3),
                         lambda m, x, p: ref_lolcats(m, x, p, THETA, 8, "sw", 3)),
    "liger": ("liger", dict(window=8), lambda m, x, p: ref_liger(m, x, p, THETA, 8, 0)),
    "liger-sinks": ("liger", dict(window=8, num_sinks=2),
                    lambda m, x, p: ref_liger(m, x, p, THETA, 8, 2)),
}


HEADS = 6     # 6 query heads over 2 kv heads: GQA order, and ALiBi's non-power-of-2 slopes


def build(name, kw, method="chunk", seed=0, kv_heads=2):
  """The mixer in layer 1 of 4 (lightning's slopes depend on depth), 6 query heads over 2 kv
  heads, with projections large enough that attention is far from uniform and every learned
  map moved off its init."""
  cfg = tiny_config(num_hidden_layers=4, num_attention_heads=HEADS, num_key_value_heads=kv_heads)
  m = get_mixer(name)(cfg, 1, rngs=nnx.Rngs(seed), method=method, **kw)
  rng = np.random.default_rng(seed)
  for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj):
    lin.kernel[...] = jnp.asarray(rng.normal(0, 0.15, lin.kernel.shape), jnp.float32)
  state = nnx.state(m, FeatureMapParam)
  leaves, tree = jax.tree.flatten(state)
  leaves = [x + jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype) for x in leaves]
  nnx.update(m, jax.tree.unflatten(tree, leaves))
  return m


def inputs(T, seed=1):
  x = np.random.default_rng(seed).normal(size=(2, T, 48))
  pos = np.broadcast_to(np.arange(T), (2, T)).copy()
  return x, pos


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixer_matches_its_published_formula(case):
  name, kw, ref = CASES[case]
  T = 32 if "tk" in case else 21                 # tk: a multiple of the window (see above)
  m = build(name, kw, kv_heads=HEADS if case.endswith("-mha") else 2)
  x, pos = inputs(T)
  want = ref(m, x, pos)
  # chunk: the training path; the hybrids' T x T form (attention transfer) too. The other
  # methods equal chunk by test_mixers.test_methods_agree.
  for method in ("chunk", "parallel") if name in ("lolcats", "liger") else ("chunk",):
    m.method = method
    got, _ = nnx.jit(lambda m, x, p: m(x, positions=p))(m, jnp.asarray(x, jnp.float32),
                                                       jnp.asarray(pos, jnp.int32))
    e = rel_err(want, got)
    assert e <= TOL, f"{case} ({method}): relative error {e:.2e} vs the published formula"
