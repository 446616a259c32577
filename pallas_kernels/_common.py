"""Shared plumbing for the chunkwise kernels: padding, layouts, varlen, backends.

Everything here is plain jnp outside the kernels. Internal layout of a kernel call:
  q, k:  [B, Tp, H * Kp]      v: [B, Tp, H * Vp]      (input dtype; a free reshape of [B,T,H,D])
  scalar gate (chunk-local cumsum, fp32): column [B, H, Tp, 1] and row [B, H, NT, 1, C]
  channel gate (chunk-local cumsum, fp32): [B, Tp, H * Kp]
  chunk states h: [B, H, NT, Kp, Vp] (input dtype), initial / final state [B, H, Kp, Vp] fp32.
Tp is T padded to a multiple of the chunk size C (zeros at the end: k = v = 0, g = 0, so the
padding neither changes the outputs nor the final state); Kp / Vp are the head dims padded
with zero channels to what the backend's block tiling wants (GPU / Triton: a power of two
>= 16; TPU / Mosaic: a multiple of 128 so blocks satisfy the (8, 128) tiling rule).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
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


def from_kernel_layout(x, T, H, D):
  B, Tp, HD = x.shape
  return x.reshape(B, Tp, H, HD // H)[:, :T, :, :D]


def chunk_cumsum(g, C):
  """Chunk-local inclusive cumsum along axis 1 (T, a multiple of C), in fp32."""
  B, T = g.shape[:2]
  gc = g.astype(f32).reshape((B, T // C, C) + g.shape[2:])
  return jnp.cumsum(gc, axis=2).reshape(g.shape)


def reverse_cumsum(x, axis=1):
  return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)


# ----------------------------------------------------------------------------- varlen

def _concrete(cu_seqlens):
  try:
    return np.asarray(cu_seqlens).astype(np.int64)
  except Exception:  # traced: lengths unknown at trace time
    return None


def varlen_unpack(cu_seqlens, T, *xs):
  """Packed [1, T, ...] arrays -> padded batch [N, L, ...] (zeros past each end).

  L is the longest sequence when cu_seqlens is concrete, else T. Returns (L, idx, valid, xs).
  """
  cu_np = _concrete(cu_seqlens)
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  N = int(cu.shape[0]) - 1
  if cu_np is not None:
    L = max(1, int(np.max(np.diff(cu_np)))) if N > 0 else 1
  else:
    L = T
  t = jnp.arange(L, dtype=jnp.int32)
  idx = cu[:-1, None] + t[None, :]                     # [N, L]
  valid = t[None, :] < (cu[1:] - cu[:-1])[:, None]
  idx_c = jnp.where(valid, idx, 0)
  out = []
  for x in xs:
    if x is None:
      out.append(None)
      continue
    y = x[0][idx_c]                                     # [N, L, ...]
    mask = valid.reshape(valid.shape + (1,) * (y.ndim - 2))
    out.append(jnp.where(mask, y, jnp.zeros((), y.dtype)))
  return L, out


def varlen_repack(cu_seqlens, T, o):
  """Padded batch [N, L, ...] -> packed [1, T, ...]."""
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  t = jnp.arange(T, dtype=jnp.int32)
  seq_id = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
  seq_id = jnp.minimum(seq_id, cu.shape[0] - 2)
  pos = t - cu[seq_id]
  return o[seq_id, pos][None]


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
