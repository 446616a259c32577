"""Feature maps for linear attention: pure functions, parameters passed explicitly.

Inputs are [..., H, D] (the ops' [B, T, H, D] layout); weights are per head, w: [H, D, F]
and b: [H, F], or shared across heads, w: [D, F] and b: [F].

  identity(x)                     x
  elu_plus_one(x)                 elu(x) + 1                           (Katharopoulos et al.)
  relu(x)                         max(x, 0)
  t2r(x, w, b)                    relu(x W + b)                        (T2R, Kasai et al.; SUPRA)
  hedgehog(x, w, b)               softmax([x W + b, -(x W + b)]) over the 2F features (Hedgehog);
                                  split=True: [softmax(xW+b), softmax(-(xW+b))] (LoLCATs)
  dpfp(x, nu)                     deterministic parameter-free projection (Schlag et al.), 2 D nu
  softmax_head(x)                 softmax over the head dim (Liger's feature map)

`FEATURE_MAPS` names them; `output_dim(name, D, F, nu)` gives the feature size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def identity(x):
  return x


def elu_plus_one(x):
  return jax.nn.elu(x) + 1.0


def relu(x):
  return jax.nn.relu(x)


def _project(x, w, b=None):
  if w.ndim == 3:          # per head: [H, D, F]
    if x.shape[-2] != w.shape[0] or x.shape[-1] != w.shape[1]:
      raise ValueError(f"`w` must have shape [H, D, F] with (H, D) = {x.shape[-2:]}, got {w.shape}")
    z = jnp.einsum("...hd,hdf->...hf", x, w.astype(x.dtype))
  elif w.ndim == 2:        # shared: [D, F]
    if x.shape[-1] != w.shape[0]:
      raise ValueError(f"`w` must have shape [D, F] with D = {x.shape[-1]}, got {w.shape}")
    z = jnp.einsum("...d,df->...f", x, w.astype(x.dtype))
  else:
    raise ValueError(f"`w` must have shape [H, D, F] or [D, F], got {w.shape}")
  if b is not None:
    if b.shape != w.shape[:-2] + w.shape[-1:]:
      raise ValueError(f"`b` must have shape {w.shape[:-2] + w.shape[-1:]} "
                       f"({'[H, F]' if w.ndim == 3 else '[F]'}), got {b.shape}")
    z = z + b.astype(z.dtype)
  return z


def t2r(x, w, b=None):
  """relu(x W + b)."""
  return jax.nn.relu(_project(x, w, b))


def hedgehog(x, w, b=None, *, split=False):
  """softmax over [xW + b, -(xW + b)] (2F features, summing to 1); split=True applies the
  softmax to each half separately (LoLCATs' variant, each half sums to 1)."""
  z = _project(x, w, b).astype(jnp.float32)
  if split:
    out = jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1)
  else:
    out = jax.nn.softmax(jnp.concatenate([z, -z], -1), -1)
  return out.astype(x.dtype)


def dpfp(x, nu=1):
  """DPFP-nu: r = [relu(x), relu(-x)] (2D); features r * roll(r, j) for j = 1..nu (2 D nu)."""
  r = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], -1)
  return jnp.concatenate([r * jnp.roll(r, j, axis=-1) for j in range(1, nu + 1)], -1)


def softmax_head(x):
  """Softmax over the head dimension (Liger's map for q and k)."""
  return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)


FEATURE_MAPS = {
    "identity": identity,
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "t2r": t2r,
    "hedgehog": hedgehog,
    "dpfp": dpfp,
    "softmax_head": softmax_head,
}


def get(name: str):
  if name not in FEATURE_MAPS:
    raise ValueError(f"unknown feature map {name!r}; one of {sorted(FEATURE_MAPS)}")
  return FEATURE_MAPS[name]


def output_dim(name: str, head_dim: int, feature_dim: int | None = None, nu: int = 1) -> int:
  """Feature size of a map applied to head_dim inputs (feature_dim = F of w for t2r/hedgehog)."""
  if name in ("identity", "elu_plus_one", "relu", "softmax_head"):
    return head_dim
  if name == "t2r":
    return feature_dim
  if name == "hedgehog":
    return 2 * feature_dim
  if name == "dpfp":
    return 2 * head_dim * nu
  raise ValueError(f"unknown feature map {name!r}; one of {sorted(FEATURE_MAPS)}")
