"""Structured FFNs: Llama's SwiGLU MLP with low-rank or block-structured projections.

Wei, Moalla, Pascanu, Gulcehre, "Investigating Low-Rank Training in Transformer Language
Models" (arXiv 2407.09835; code CLAIRE-Labo/StructuredFFN). Each of gate_proj, up_proj and
down_proj (W: [in, out], kernels are [in, out] as in `dense`) becomes

  "lowrank"     y = (x V) U                  V [in, r], U [r, out]      the paper's LowRank
  "block"       y = f^-1((f(x V^b)) U^b)     V^b, U^b block-diagonal    BlockShuffle (Monarch)
  "blockdense"  y = (x V^b) U                V^b block-diagonal [in, r], U [r, out]  BlockDense

and the MLP stays down(silu(gate(x)) * up(x)). The factors are always named `v` (applied
first) and `u`, so a layer's paths read `mlp.gate_proj.v.kernel`. Dense factors are
`nnx.Linear`s (LoRA targets them as "gate_proj.u", ...; `lora_targets` expands a projection
name into its factors); block-diagonal ones are `BlockDiagonal` ([nb, in/nb, out/nb] kernels).

Config (`LlamaConfig`): `mlp` ("dense" | "lowrank" | "block" | "blockdense", or one per
layer), `mlp_rank` (int, or a float in (0, 1]: a fraction of min(hidden, intermediate);
one value or one per layer) for lowrank / blockdense, `mlp_blocks` (int, one or per layer)
for block / blockdense. `resolve_mlp_fields` normalises them to per-layer tuples and names
the field when a value is bad.

Shuffle (BlockShuffle, as in the paper's code): with k = nb blocks, V^b maps block a's p
inputs to q outputs; the k*q intermediate features, flattened block-major, are read as an
[r, l] grid (feature index rho * l + lam) and block lam of U^b takes column lam (r features)
to its s outputs; output index sigma * l + lam. A dense W [in, out] is projected onto this
structure exactly (Frobenius-optimal) by `block_shuffle_project`: every (input block a,
output block lam) sub-matrix of W depends on its own disjoint set of middle features, so a
truncated SVD per sub-matrix is the best fit (Dao et al.'s Monarch projection, generalised).

Initialisation from scratch (the paper's `post_init`): lowrank factors are the truncated
SVD (sqrt(S) on each side) of a dense normal(initializer_range) draw; block and blockdense
factors are orthogonalised per block (U Vh of their own draw) and scaled so the product's
output scale matches the dense initialiser's (std * sqrt(out)).
Not implemented: the paper's self-guided training (a decaying dense residual W x during
early training) and its fused gate+up factor (one V for both): linjax factorises gate, up
and down separately so each maps to its own truncated SVD of a pretrained matrix.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linjax.layers.mlp import ACTIVATIONS, LlamaMLP, dense

MLP_KINDS = ("dense", "lowrank", "block", "blockdense")
RANKED = ("lowrank", "blockdense")
BLOCKED = ("block", "blockdense")


# ------------------------------------------------------------------ config validation

def _per_layer(value, n: int, field: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"config field {field!r} has {len(value)} entries for {n} layers")
    return tuple(value)
  return (value,) * n


def resolve_rank(value, hidden: int, inter: int, field: str = "mlp_rank") -> int:
  """An int rank (>= 1, <= min(hidden, intermediate)) from an int or a fraction in (0, 1]."""
  full = min(hidden, inter)
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f"config field {field} must be an int rank or a float fraction in "
                     f"(0, 1], got {value!r}")
  if isinstance(value, (float, np.floating)):
    if not 0.0 < float(value) <= 1.0:
      raise ValueError(f"config field {field}: a float rank is a fraction of "
                       f"min(hidden_size, intermediate_size) = {full} in (0, 1], got {value}")
    return max(1, int(round(float(value) * full)))
  value = int(value)
  if value < 1:
    raise ValueError(f"config field {field} must be >= 1, got {value}")
  if value > full:
    raise ValueError(f"config field {field}: rank {value} is larger than min(hidden_size, "
                     f"intermediate_size) = {full}, the rank of the dense matrix")
  return value


def check_blocks(blocks, dims: tuple, field: str = "mlp_blocks") -> int:
  if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 1:
    raise ValueError(f"config field {field} must be an int >= 1, got {blocks!r}")
  bad = [d for d in dims if d % blocks]
  if bad:
    raise ValueError(f"config field {field}: {blocks} blocks do not divide the FFN "
                     f"dimension(s) {bad} (hidden_size / intermediate_size / rank)")
  return int(blocks)


def resolve_mlp_fields(mlp, mlp_rank, mlp_blocks, hidden: int, inter: int, n: int):
  """(kinds, ranks, blocks): per-layer tuples; ranks / blocks are None where unused.
  Raises ValueError naming the field (and layer) of a bad value."""
  kinds = _per_layer("dense" if mlp is None else mlp, n, "mlp")
  bad = sorted({str(k) for k in kinds if k not in MLP_KINDS})
  if bad:
    raise ValueError(f"config field 'mlp': unknown FFN kind(s) {bad}; one of {MLP_KINDS}")
  ranks = _per_layer(mlp_rank, n, "mlp_rank")
  blocks = _per_layer(mlp_blocks, n, "mlp_blocks")
  out_r, out_b = [], []
  for i, (k, r, b) in enumerate(zip(kinds, ranks, blocks)):
    where = f" (layer {i}, mlp={k!r})"
    if k in RANKED:
      if r is None:
        raise ValueError(f"config field 'mlp_rank' is required{where}")
      r = resolve_rank(r, hidden, inter, field="'mlp_rank'" + where)
    else:
      r = None
    if k in BLOCKED:
      if b is None:
        raise ValueError(f"config field 'mlp_blocks' is required{where}")
      b = check_blocks(b, (hidden, inter) + ((r,) if k == "blockdense" else ()),
                       field="'mlp_blocks'" + where)
    else:
      b = None
    out_r.append(r)
    out_b.append(b)
  return kinds, tuple(out_r), tuple(out_b)


# ------------------------------------------------------------------ the structured linears

@functools.partial(jax.jit, static_argnums=(1, 2))
def _orthogonal(key, shape, scale):
  """Per-block U Vh of a normal draw (shape [..., m, n]), times `scale` (one compiled
  program per shape: eager construction compiles it once, not op by op)."""
  w = jax.random.normal(key, shape, jnp.float32)
  u, _, vh = jnp.linalg.svd(w, full_matrices=False)
  return scale * (u @ vh)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _svd_init(key, shape, rank, std):
  """(V, U): the rank-`rank` truncated SVD of a normal(std) draw of `shape`, sqrt(S) each."""
  w = std * jax.random.normal(key, shape, jnp.float32)
  a, s, bh = jnp.linalg.svd(w, full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return a[:, :rank] * root, root[:, None] * bh[:rank]


def _gain(m, n):
  """||x Q|| / ||x|| of an orthonormal [m, n] map on a random x."""
  return math.sqrt(min(m, n) / m)


def _init_scale(std, out_features, gains):
  """Per-factor scale so a product of orthonormal factors with these gains has the dense
  initialiser's output scale std * sqrt(out)."""
  return math.sqrt(std * math.sqrt(out_features) / math.prod(gains))


def block_apply(x, kernel):
  """x [..., nb * p] -> [..., nb * q] through the blocks of kernel [nb, p, q]."""
  nb, p, q = kernel.shape
  xb = x.reshape(*x.shape[:-1], nb, p)
  return jnp.einsum("...kp,kpq->...kq", xb, kernel).reshape(*x.shape[:-1], nb * q)


class BlockDiagonal(nnx.Module):
  """x [..., nb * p] -> [..., nb * q] with one [p, q] kernel per block (kernel [nb, p, q])."""

  def __init__(self, in_features, out_features, blocks, *, dtype, param_dtype, rngs, scale=1.0):
    self.blocks = int(blocks)
    p, q = in_features // blocks, out_features // blocks
    self.dtype = dtype
    w = _orthogonal(rngs.params(), (blocks, p, q), scale).astype(param_dtype)
    self.kernel = nnx.Param(w, out_sharding=("mlp_blocks", None, None), eager_sharding=False)

  def __call__(self, x):
    dt = self.dtype or x.dtype
    return block_apply(x.astype(dt), self.kernel[...].astype(dt))


def _bias(out_features, axis, param_dtype):
  return nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(axis,),
                   eager_sharding=False)


class LowRankLinear(nnx.Module):
  """y = (x V) U (+ bias): `v` = dense(in, r), `u` = dense(r, out) (bias on `u`)."""

  def __init__(self, in_features, out_features, rank, axes, *, use_bias=False, dtype=None,
               param_dtype=jnp.float32, rngs, std=0.02, init="svd"):
    self.rank = int(rank)
    self.in_features, self.out_features = int(in_features), int(out_features)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=std)
    self.v = dense(in_features, rank, (axes[0], "mlp_rank"), **kw)
    self.u = dense(rank, out_features, ("mlp_rank", axes[1]), use_bias=use_bias, **kw)
    if init == "svd":   # the paper's post_init: truncated SVD of a dense draw
      v, u = _svd_init(rngs.params(), (self.in_features, self.out_features), self.rank,
                       float(std))
      self.v.kernel[...] = v.astype(param_dtype)
      self.u.kernel[...] = u.astype(param_dtype)
    elif init != "normal":
      raise ValueError(f"LowRankLinear init must be 'svd' or 'normal', got {init!r}")

  def __call__(self, x):
    return self.u(self.v(x))

  def to_dense(self):
    """The [in, out] matrix V U in float32."""
    return self.v.kernel[...].astype(jnp.float32) @ self.u.kernel[...].astype(jnp.float32)


def shuffle(z, blocks):
  """f: [..., k * q] (block-major) -> [..., l * r]: feature rho * l + lam goes to lam * r + rho
  (the [r, l] grid read column by column, so block lam of U^b sees column lam)."""
  r = z.shape[-1] // blocks
  z = jnp.swapaxes(z.reshape(*z.shape[:-1], r, blocks), -1, -2)
  return z.reshape(*z.shape[:-2], blocks * r)


def unshuffle(y, blocks):
  """f^-1 on the output: [..., l * s] (block-major) -> index sigma * l + lam."""
  s = y.shape[-1] // blocks
  y = jnp.swapaxes(y.reshape(*y.shape[:-1], blocks, s), -1, -2)
  return y.reshape(*y.shape[:-2], blocks * s)


class BlockShuffleLinear(nnx.Module):
  """BlockShuffle (Monarch): y = f^-1(f(x V^b) U^b) (+ bias); see the module docstring."""

  def __init__(self, in_features, out_features, blocks, axes, *, use_bias=False, dtype=None,
               param_dtype=jnp.float32, rngs, std=0.02):
    self.blocks = int(blocks)
    self.in_features, self.out_features = int(in_features), int(out_features)
    mid = min(in_features, out_features)   # the paper's choice: q = r = min(in, out) / nb
    nb = self.blocks
    scale = _init_scale(std, out_features,
                        (_gain(in_features // nb, mid // nb), _gain(mid // nb, out_features // nb)))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, scale=scale)
    self.v = BlockDiagonal(in_features, mid, blocks, **kw)
    self.u = BlockDiagonal(mid, out_features, blocks, **kw)
    self.bias = _bias(out_features, axes[1], param_dtype) if use_bias else None

  def __call__(self, x):
    y = unshuffle(self.u(shuffle(self.v(x), self.blocks)), self.blocks)
    return y if self.bias is None else y + self.bias[...].astype(y.dtype)

  def to_dense(self):
    eye = jnp.eye(self.in_features, dtype=jnp.float32)
    z = shuffle(block_apply(eye, self.v.kernel[...].astype(jnp.float32)), self.blocks)
    return unshuffle(block_apply(z, self.u.kernel[...].astype(jnp.float32)), self.blocks)


class BlockDenseLinear(nnx.Module):
  """BlockDense: y = (x V^b) U (+ bias): block-diagonal `v` [in -> r], dense `u` [r, out]."""

  def __init__(self, in_features, out_features, rank, blocks, axes, *, use_bias=False,
               dtype=None, param_dtype=jnp.float32, rngs, std=0.02):
    self.rank, self.blocks = int(rank), int(blocks)
    self.in_features, self.out_features = int(in_features), int(out_features)
    scale = _init_scale(std, out_features, (_gain(in_features // blocks, rank // blocks),
                                            _gain(rank, out_features)))
    self.v = BlockDiagonal(in_features, rank, blocks, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs, scale=scale)
    self.u = dense(rank, out_features, ("mlp_rank", axes[1]), use_bias=use_bias, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs, std=std)
    self.u.kernel[...] = _orthogonal(rngs.params(), (rank, out_features), scale).astype(param_dtype)

  def __call__(self, x):
    return self.u(self.v(x))

  def to_dense(self):
    eye = jnp.eye(self.in_features, dtype=jnp.float32)
    return block_apply(eye, self.v.kernel[...].astype(jnp.float32)) @ self.u.kernel[...].astype(jnp.float32)


def structured_linear(kind, in_features, out_features, axes, *, rank=None, blocks=None, **kw):
  if kind == "lowrank":
    return LowRankLinear(in_features, out_features, rank, axes, **kw)
  if kind == "block":
    return BlockShuffleLinear(in_features, out_features, blocks, axes, **kw)
  if kind == "blockdense":
    return BlockDenseLinear(in_features, out_features, rank, blocks, axes, **kw)
  raise ValueError(f"unknown structured FFN kind {kind!r}; one of {MLP_KINDS[1:]}")


class StructuredMLP(nnx.Module):
  """down_proj(act(gate_proj(x)) * up_proj(x)) with structured projections (HF names)."""

  def __init__(self, config, layer_idx: int, *, rngs: nnx.Rngs):
    self.kind = config.mlp[layer_idx]
    h, m = config.hidden_size, config.intermediate_size
    kw = dict(rank=config.mlp_rank[layer_idx], blocks=config.mlp_blocks[layer_idx],
              use_bias=config.mlp_bias, dtype=config.jnp_dtype,
              param_dtype=config.jnp_param_dtype, rngs=rngs, std=config.initializer_range)
    self.gate_proj = structured_linear(self.kind, h, m, ("embed", "mlp"), **kw)
    self.up_proj = structured_linear(self.kind, h, m, ("embed", "mlp"), **kw)
    self.down_proj = structured_linear(self.kind, m, h, ("mlp", "embed"), **kw)
    self.act = config.hidden_act

  def __call__(self, x):
    return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


def build_mlp(config, layer_idx: int, *, rngs: nnx.Rngs):
  """The FFN of layer `layer_idx`: `LlamaMLP` when config.mlp[layer_idx] is "dense"."""
  if config.mlp[layer_idx] == "dense":
    return LlamaMLP(config, rngs=rngs)
  return StructuredMLP(config, layer_idx, rngs=rngs)


def lora_targets(targets) -> tuple:
  """LoRA targets that also reach structured projections: each name `t` adds `t.u` and `t.v`
  (the dense factors of a low-rank projection, the dense `u` of a blockdense one; a
  block-diagonal factor is not a 2-D kernel and LoRA refuses it)."""
  targets = (targets,) if isinstance(targets, str) else tuple(targets)
  out = list(targets)
  for t in targets:
    if t.endswith(("gate_proj", "up_proj", "down_proj")):
      out += [f"{t}.v", f"{t}.u"]
  return tuple(out)


def mlp_param_count(kind, hidden, inter, rank=None, blocks=None) -> int:
  """Weights (no biases) of one SwiGLU FFN of `kind` (gate + up + down)."""
  def one(i, o):
    if kind == "dense":
      return i * o
    if kind == "lowrank":
      return (i + o) * rank
    if kind == "block":
      mid = min(i, o)
      return (i * mid + mid * o) // blocks
    if kind == "blockdense":
      return i * rank // blocks + rank * o
    raise ValueError(f"unknown FFN kind {kind!r}")
  return 2 * one(hidden, inter) + one(inter, hidden)


# ------------------------------------------------------------------ projections of a dense W

@jax.jit
def _svd_f32(w):
  return jnp.linalg.svd(w, full_matrices=False)


def svd(w):
  """Thin SVD (u, s, vh) of a numpy matrix, computed by XLA's LAPACK in float32 and returned
  as float64 numpy arrays (numpy's threaded OpenBLAS SVD is ~10-25x slower beside JAX's
  threads on a small CPU)."""
  u, s, vh = _svd_f32(jnp.asarray(w, jnp.float32))
  return (np.asarray(u, np.float64), np.asarray(s, np.float64), np.asarray(vh, np.float64))


def lowrank_project(w: np.ndarray, rank: int):
  """(V [in, r], U [r, out], relative Frobenius error, singular values) of the truncated SVD
  of w [in, out]; sqrt(S) goes to each factor."""
  w = np.asarray(w, np.float64)
  a, s, bh = svd(w)
  root = np.sqrt(s[:rank])
  tail = float(np.sum(s[rank:] ** 2))
  err = math.sqrt(tail / max(float(np.sum(s ** 2)), 1e-300))
  return a[:, :rank] * root, root[:, None] * bh[:rank], err, s


def _groups(in_features, out_features, blocks):
  """For BlockShuffle: p, q, s (block sizes) and, per (input block a, output block lam), the
  list of (rho, c) middle features that connect them."""
  mid = min(in_features, out_features)
  p, q, s = in_features // blocks, mid // blocks, out_features // blocks
  l = blocks
  groups = {}
  for lam in range(l):
    for rho in range(mid // blocks):
      f = rho * l + lam              # middle feature index (block-major: a * q + c)
      groups.setdefault((f // q, lam), []).append((rho, f % q))
  return p, q, s, groups


def block_shuffle_project(w: np.ndarray, blocks: int):
  """(V^b [nb, p, q], U^b [nb, r, s], relative Frobenius error): the Frobenius-optimal
  BlockShuffle approximation of w [in, out] (one truncated SVD per sub-matrix; module
  docstring). Exact when w is a BlockShuffle matrix, and for blocks = 1."""
  w = np.asarray(w, np.float64)
  n_in, n_out = w.shape
  p, q, s, groups = _groups(n_in, n_out, blocks)
  mid = min(n_in, n_out)
  v = np.zeros((blocks, p, q))
  u = np.zeros((blocks, mid // blocks, s))
  tail = 0.0
  for (a, lam), feats in groups.items():
    sub = w[a * p:(a + 1) * p, lam::blocks]         # rows of block a, columns sigma*l + lam
    x, sv, yh = svd(sub)
    k = len(feats)
    root = np.sqrt(sv[:k])
    for i, (rho, c) in enumerate(feats):
      v[a, :, c] = x[:, i] * root[i]
      u[lam, rho, :] = root[i] * yh[i]
    tail += float(np.sum(sv[k:] ** 2))
  err = math.sqrt(tail / max(float(np.sum(w ** 2)), 1e-300))
  return v, u, err
