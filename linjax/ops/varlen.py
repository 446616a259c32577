"""Packed variable-length batches (`cu_seqlens`) for the recurrence ops.

A packed batch is `[1, T, ...]` holding N sequences back to back, `cu_seqlens = [0, t1, ..., T]`
(N + 1 offsets; equal neighbours mark an empty sequence). The ops run it by unpacking into a
padded `[N, max_seqlen, ...]` batch, padding at the end with zeros (k = v = 0, g = 0, beta = 0,
so the state is carried unchanged through the padding and the padded run's final state is each
sequence's final state; an empty sequence returns its initial state), running the dense op and
packing the outputs back. Tokens after `cu_seqlens[-1]` belong to no sequence and get zeros.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def num_seqs(cu_seqlens) -> int:
  return int(cu_seqlens.shape[0]) - 1


def check_cu_seqlens(cu_seqlens, T: int, B: int, max_seqlen=None) -> int:
  """Validates the packed layout; returns the padded length to use."""
  if getattr(cu_seqlens, "ndim", None) != 1 or cu_seqlens.shape[0] < 2:
    raise ValueError(f"`cu_seqlens` must have shape [N + 1] (N >= 1 sequences), got "
                     f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}")
  if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
    raise ValueError(f"`cu_seqlens` must be an integer array, got dtype {cu_seqlens.dtype}")
  if B != 1:
    raise ValueError(f"`cu_seqlens` needs a packed batch: q must be [1, T, H, K], got B={B}")
  try:  # concrete offsets: check them; traced ones are trusted.
    cu = np.asarray(cu_seqlens)
  except Exception:  # noqa: BLE001 - a tracer
    cu = None
  if cu is not None:
    if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] > T:
      raise ValueError(f"`cu_seqlens` must start at 0, be non-decreasing and end <= T={T}, "
                       f"got {cu.tolist()}")
    longest = int(np.diff(cu).max())
    if max_seqlen is not None and max_seqlen < longest:
      raise ValueError(f"`max_seqlen`={max_seqlen} is shorter than the longest sequence "
                       f"({longest})")
    if max_seqlen is None:
      max_seqlen = longest
  if max_seqlen is None:
    max_seqlen = T
  return max(int(max_seqlen), 1)


def unpack(x, cu_seqlens, max_seqlen: int):
  """[1, T, ...] -> [N, max_seqlen, ...], zero after each sequence's end."""
  if x is None:
    return None
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  T = x.shape[1]
  t = jnp.arange(max_seqlen, dtype=jnp.int32)
  idx = cu[:-1, None] + t[None, :]                       # [N, L]
  valid = t[None, :] < (cu[1:] - cu[:-1])[:, None]       # [N, L]
  out = x[0][jnp.clip(idx, 0, T - 1)]                    # [N, L, ...]
  valid = valid.reshape(valid.shape + (1,) * (out.ndim - 2))
  return jnp.where(valid, out, jnp.zeros((), x.dtype))


def repack(y, cu_seqlens, T: int):
  """[N, L, ...] -> [1, T, ...]: the inverse of `unpack` on the valid tokens."""
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  N, L = y.shape[:2]
  p = jnp.arange(T, dtype=jnp.int32)
  seq = jnp.clip(jnp.searchsorted(cu[1:], p, side="right").astype(jnp.int32), 0, N - 1)
  off = p - cu[seq]
  valid = (p < cu[-1]) & (off < L)
  out = y[seq, jnp.clip(off, 0, L - 1)]                  # [T, ...]
  valid = valid.reshape(valid.shape + (1,) * (out.ndim - 1))
  return jnp.where(valid, out, jnp.zeros((), y.dtype))[None]
