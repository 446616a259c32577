"""Feature maps phi for linear attention: the one home of their definitions (pure functions).

Inputs are per head, [..., H, D] (the ops' [B, T, H, D] layout); outputs [..., H, F].
Learned maps take their weights explicitly: per head, w [H, D, F'] and b [H, F'], or shared
across heads, w [D, F'] and b [F'].

  kind       phi(x)                                              F        from
  identity   x                                                   D
  elu        elu(x) + 1                                          D        Katharopoulos et al. 2020
  relu       max(x, 0)                                           D
  softmax    softmax(x) over the head dim                        D        Liger (q and k maps)
  silu_l2    l2norm(silu(x))                                     D        DeltaNet
  l2         l2norm(x)                                           D
  dpfp       r = [relu(x), relu(-x)];  [r * roll(r, j)]_{j=1..nu} 2 D nu   Schlag et al. 2021
  t2r        relu(x W + b)                                       F'       T2R (Kasai et al. 2021)
  hedgehog   [softmax(x W + b), softmax(-(x W + b))], each half  2 F'     Hedgehog (Zhang et al.
             over its F' features, then max(., 1e-12)                     2024) as LoLCATs ships it

"hedgehog" is the LoLCATs form (`SoftmaxDim` in the LoLCATs code: the two halves are
normalised separately and floored at eps = 1e-12 so no feature is exactly zero). The
Hedgehog paper writes the unnormalised [exp(xW), exp(-xW)]; the per-half softmax divides
each half by a positive per-token constant, which keeps the map positive and its exps
bounded, and is what LoLCATs and linjax train.

`apply(kind, x, weight, bias)` dispatches by name; `output_dim(kind, D, F', nu)` gives F.
Everything is computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("identity", "elu", "relu", "softmax", "silu_l2", "l2", "dpfp", "t2r", "hedgehog")
LEARNED = ("t2r", "hedgehog")
HEDGEHOG_EPS = 1e-12


def identity(x):
  return x.astype(jnp.float32)


def elu(x):
  """elu(x) + 1 (positive)."""
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def relu(x):
  return jax.nn.relu(x.astype(jnp.float32))


def softmax(x):
  """Softmax over the head dimension (Liger's map for q and k)."""
  return jax.nn.softmax(x.astype(jnp.float32), axis=-1)


def l2(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt((x * x).sum(-1, keepdims=True) + eps)


def silu_l2(x):
  return l2(jax.nn.silu(x.astype(jnp.float32)))


def dpfp(x, nu=1):
  """DPFP-nu: r = [relu(x), relu(-x)] (2D); features r * roll(r, j) for j = 1..nu (2 D nu)."""
  x = x.astype(jnp.float32)
  r = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], -1)
  return jnp.concatenate([r * jnp.roll(r, j, axis=-1) for j in range(1, nu + 1)], -1)


def _project(x, w, b=None):
  x = x.astype(jnp.float32)
  w = jnp.asarray(w)
  if w.ndim == 3:          # per head: [H, D, F]
    if x.shape[-2] != w.shape[0] or x.shape[-1] != w.shape[1]:
      raise ValueError(f"`w` must have shape [H, D, F] with (H, D) = {x.shape[-2:]}, got {w.shape}")
    z = jnp.einsum("...hd,hdf->...hf", x, w.astype(jnp.float32))
  elif w.ndim == 2:        # shared: [D, F]
    if x.shape[-1] != w.shape[0]:
      raise ValueError(f"`w` must have shape [D, F] with D = {x.shape[-1]}, got {w.shape}")
    z = jnp.einsum("...d,df->...f", x, w.astype(jnp.float32))
  else:
    raise ValueError(f"`w` must have shape [H, D, F] or [D, F], got {w.shape}")
  if b is not None:
    b = jnp.asarray(b)
    if b.shape != w.shape[:-2] + w.shape[-1:]:
      raise ValueError(f"`b` must have shape {w.shape[:-2] + w.shape[-1:]} "
                       f"({'[H, F]' if w.ndim == 3 else '[F]'}), got {b.shape}")
    z = z + b.astype(jnp.float32)
  return z


def t2r(x, w, b=None):
  """relu(x W + b)."""
  return jax.nn.relu(_project(x, w, b))


def hedgehog(x, w, b=None):
  """[softmax(x W + b), softmax(-(x W + b))] (each half over its own features), >= 1e-12."""
  z = _project(x, w, b)
  out = jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1)
  return jnp.maximum(out, HEDGEHOG_EPS)


_FIXED = {"identity": identity, "elu": elu, "relu": relu, "softmax": softmax,
          "silu_l2": silu_l2, "l2": l2, "dpfp": dpfp}


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown feature map {kind!r}; one of {KINDS}")
  return kind


def apply(kind: str, x, weight=None, bias=None):
  """phi(x) for x [..., H, D]; `weight` / `bias` for the learned kinds (t2r, hedgehog)."""
  check_kind(kind)
  if kind in LEARNED:
    if weight is None:
      raise ValueError(f"feature map {kind!r} needs a weight [H, D, F] or [D, F]")
    return t2r(x, weight, bias) if kind == "t2r" else hedgehog(x, weight, bias)
  return _FIXED[kind](x)


def output_dim(kind: str, head_dim: int, feature_dim: int | None = None, nu: int = 1) -> int:
  """Feature size F of `kind` on head_dim inputs (feature_dim = F' of w for t2r / hedgehog,
  default head_dim)."""
  check_kind(kind)
  fd = head_dim if feature_dim is None else feature_dim
  if kind == "t2r":
    return fd
  if kind == "hedgehog":
    return 2 * fd
  if kind == "dpfp":
    return 2 * head_dim * nu
  return head_dim
