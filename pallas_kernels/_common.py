"""Shared plumbing for the chunkwise kernels: padding, layouts, varlen, backends.

Everything here is plain jnp outside the kernels. Internal layout of a kernel call:
  q, k:  [B, Tp, H * Kp]      v: [B, Tp, H * Vp]      (input dtype; a free reshape of [B,T,H,D])
  scalar gate (chunk-local cumsum, fp32): column [B, H, Tp, 1] and row [B, H, NT, 1, C]
  channel gate (chunk-local cumsum, fp32): [B, Tp, H * Kp] and its last row per chunk as a
    column [B, H, NT, Kp, 1]
  chunk states h: [B, H, NT, Kp, Vp] (input dtype in the two-pass forward, fp32 in the
    backward), initial / final state [B | N, H, Kp, Vp] fp32.
Tp is T padded to a multiple of G chunks of size C (G = chunks per TPU grid step; zeros at
the end: k = v = 0, g = 0, so the padding neither changes the outputs nor the final state);
Kp / Vp are the head dims padded with zero channels to what the backend's block tiling wants
(GPU / Triton: a power of two >= 16; TPU / Mosaic: a multiple of 128 so blocks satisfy the
(8, 128) tiling rule). Packed sequences (cu_seqlens) go through `aligned_layout` first.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

f32 = jnp.float32


def next_pow2(n, lo=16):
  p = lo
  while p < n:
    p *= 2
  return p


def padded_dim(n, backend):
  if backend == "tpu":
    return max(128, -(-n // 128) * 128)
  return next_pow2(n, 16)


def interpret_arg(interpret):
  """`interpret=True` -> Pallas' TPU interpreter with NaN-filled uninitialised memory and
  out-of-bounds reads raising, so a kernel that reads what it never wrote fails the tests."""
  if interpret is True:
    return pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")
  if interpret == "plain":  # the discharge interpreter: no callbacks, fits inside lax.cond
    return True
  return interpret


def compiler_params(backend, semantics, num_warps=4, num_stages=2):
  if backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=semantics)
  # Pallas' Triton backend ships inside jaxlib: no jax-triton needed. jax-triton is for
  # calling hand-written Triton kernels from JAX; every kernel here is written in Pallas, so
  # one source lowers to both Triton (GPU) and Mosaic (TPU), and interprets on CPU.
  from jax.experimental.pallas import triton as pltr
  return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def pad_axis(x, axis, size):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def to_kernel_layout(x, Tp, Dp):
  """[B, T, H, D] -> [B, Tp, H * Dp] (zero padded)."""
  B, T, H, D = x.shape
  x = pad_axis(pad_axis(x, 1, Tp), 3, Dp)
  return x.reshape(B, Tp, H * Dp)


def chunk_cumsum(g, C):
  """Chunk-local inclusive cumsum along axis 1 (T, a multiple of C), in fp32."""
  B, T = g.shape[:2]
  gc = g.astype(f32).reshape((B, T // C, C) + g.shape[2:])
  return jnp.cumsum(gc, axis=2).reshape(g.shape)


# ----------------------------------------------------------------------------- varlen

def _concrete(x):
  try:
    return np.asarray(x).astype(np.int64)
  except Exception:  # noqa: BLE001 - traced: values unknown at trace time
    return None


def aligned_layout(cu_seqlens, T, C):
  """Packed sequences [1, T] (offsets cu_seqlens [N + 1], concrete or traced) -> a layout in
  which every sequence starts on a chunk boundary: sequence n occupies chunks
  [astart_n / C, aend_n / C), its tokens first, then zeros up to the next multiple of C.

  The padded length is static: sum_n roundup(len_n, C) <= T + N (C - 1), so Tp is that bound
  (or the exact total when cu_seqlens is concrete): T + N * C work at most, not N * T.
  Tokens after cu_seqlens[-1] belong to no sequence and are not placed.

  Returns a dict of int32 / bool arrays (and the static Tp):
    src [Tp], valid [Tp]   packed index of each layout position; valid = holds a token
    dst [T], live [T]      layout position of each packed token; live = t < cu_seqlens[-1]
    cstart [NT], cend [NT] n where chunk c is the first / last chunk of (non-empty)
                           sequence n, else -1
    empty [N]              the sequence has no tokens (its final state is its initial one)
  """
  cu_np = _concrete(cu_seqlens)
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  N = int(cu.shape[0]) - 1
  if cu_np is not None:
    Tp = int(np.sum(-(-np.diff(cu_np) // C) * C))
  else:
    Tp = T + N * (C - 1)
  Tp = max(C, -(-Tp // C) * C)
  NT = Tp // C
  lens = cu[1:] - cu[:-1]
  alen = (lens + C - 1) // C * C
  aend = jnp.cumsum(alen)
  astart = aend - alen
  p = jnp.arange(Tp, dtype=jnp.int32)
  n_p = jnp.searchsorted(aend, p, side="right").astype(jnp.int32)   # N past the last block
  n_c = jnp.minimum(n_p, N - 1)
  local = p - astart[n_c]
  valid = (n_p < N) & (local < lens[n_c])
  src = jnp.where(valid, cu[n_c] + local, 0)
  first = p[::C]
  cstart = jnp.where(valid[first] & (local[first] == 0), n_c[first], -1)
  last = first + C - 1
  n_l = n_p[last]
  n_lc = jnp.minimum(n_l, N - 1)
  cend = jnp.where((n_l < N) & (last + 1 == aend[n_lc]) & (lens[n_lc] > 0), n_lc, -1)
  t = jnp.arange(T, dtype=jnp.int32)
  n_t = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32), N - 1)
  live = t < cu[-1]
  dst = jnp.clip(astart[n_t] + t - cu[n_t], 0, Tp - 1)
  return dict(Tp=Tp, NT=NT, N=N, src=src, valid=valid, dst=dst, live=live,
              cstart=cstart.astype(jnp.int32), cend=cend.astype(jnp.int32), empty=lens == 0)


def to_aligned(lay, x):
  """[1, T, ...] -> [1, Tp, ...] in the aligned layout (zeros where no token)."""
  if x is None:
    return None
  y = x[0][lay["src"]]
  mask = lay["valid"].reshape((-1,) + (1,) * (y.ndim - 1))
  return jnp.where(mask, y, jnp.zeros((), y.dtype))[None]


def from_aligned(lay, y):
  """[1, Tp, ...] -> [1, T, ...]: each packed token's value; zeros after cu_seqlens[-1]."""
  out = y[0][lay["dst"]]
  mask = lay["live"].reshape((-1,) + (1,) * (out.ndim - 1))
  return jnp.where(mask, out, jnp.zeros((), out.dtype))[None]


def on_platforms(fn_tpu, fn_gpu, fn_cpu, *args):
  """Pick the lowering by the platform being compiled for (so jax.export to 'tpu' or 'cuda'
  from a CPU host takes the right kernel); CPU runs the kernels in interpret mode."""
  return jax.lax.platform_dependent(*args, tpu=fn_tpu, cuda=fn_gpu, rocm=fn_gpu,
                                    default=fn_cpu)


def inv_unit_lower(L):
  """(I + L)^-1 for strictly lower-triangular L [..., C, C], in float32.

  Recursive 2x2 block inversion, [[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]]:
  matmuls only, log2(C) levels, differentiable by plain autodiff. It replaces LAPACK's
  triangular solve, which deadlocks in jaxlib's CPU thread pool when several devices of one
  process call it at once (seen with 8 fake CPU devices).
  """
  shape = L.shape
  C = shape[-1]
  return _inv_unit_lower(L.astype(jnp.float32).reshape(-1, C, C)).reshape(shape)


def _inv_unit_lower(L):
  """L: [N, C, C]; the batch stays one flat axis (deep batch ranks crash XLA:CPU's dot)."""
  N, C = L.shape[0], L.shape[-1]
  if C == 1:
    return jnp.ones_like(L)
  h = C // 2
  A, B, D = L[:, :h, :h], L[:, h:, :h], L[:, h:, h:]
  if C - h == h:  # invert both diagonal blocks in one batched call
    both = _inv_unit_lower(jnp.concatenate([A, D], axis=0))
    Ai, Di = both[:N], both[N:]
  else:
    Ai, Di = _inv_unit_lower(A), _inv_unit_lower(D)
  low = -jnp.matmul(Di, jnp.matmul(B, Ai, precision="highest"), precision="highest")
  top = jnp.concatenate([Ai, jnp.zeros((N, h, C - h), L.dtype)], -1)
  return jnp.concatenate([top, jnp.concatenate([low, Di], -1)], -2)
