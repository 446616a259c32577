"""Packed variable-length batches (`cu_seqlens`) for the recurrence ops.

A packed batch is `[1, T, ...]` holding N sequences back to back, `cu_seqlens = [0, t1, ..., T]`
(N + 1 offsets; equal neighbours mark an empty sequence). Tokens after `cu_seqlens[-1]` belong
to no sequence and get zeros. Three ways to run one, by method:

  chunk, assoc_scan, pallas   the aligned layout (`aligned`): every sequence starts on a chunk
      boundary, padded with zeros (k = v = g = beta = 0 carry the state unchanged) to the next
      multiple of the chunk size C. Its length is static whether or not cu_seqlens is traced:
      sum_n roundup(len_n, C) <= T + N (C - 1), so the work is T + N C tokens, never N T. The
      chunk recurrence then loads sequence n's initial state at its first chunk (`cstart`) and
      its final state is the state leaving its last chunk (`cend`); an empty sequence keeps
      its initial state.
  recurrent   the packed row as it is, one token at a time: the state is replaced by the
      sequence's initial state at its first token and recorded at its last (`packed`).
  parallel    one chunk per sequence: with concrete offsets, `unpack` to [N, max_seqlen]
      (the longest sequence, not T); with traced offsets the lengths are unknown, so it runs
      the aligned chunk form (chunk_size) instead.
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


# ------------------------------------------------------------------ aligned / packed layouts

def concrete(cu_seqlens):
  """The offsets as numpy when known at trace time, else None."""
  try:
    return np.asarray(cu_seqlens)
  except Exception:  # noqa: BLE001 - a tracer
    return None


def aligned(cu_seqlens, T: int, C: int):
  """The chunk-aligned layout (see the module docstring; `pallas_kernels._common`)."""
  from pallas_kernels._common import aligned_layout  # trace time: keeps Pallas out of import
  return aligned_layout(cu_seqlens, T, C)


def to_aligned(lay, x):
  from pallas_kernels._common import to_aligned as f
  return f(lay, x)


def from_aligned(lay, y):
  from pallas_kernels._common import from_aligned as f
  return f(lay, y)


def chunk_starts(lay, h0):
  """Per-chunk injection of the initial states: (cstart [n] int32, h0 of each chunk
  [1, H, n, K, V]) for the chunk recurrences (zeros where no sequence starts)."""
  cs = lay["cstart"]
  return cs, jnp.moveaxis(h0[jnp.maximum(cs, 0)], 0, 1)[None]


def finals(lay, S_end, h0):
  """Each sequence's final state [N, H, K, V] from the states leaving every chunk
  S_end [1, H, n, K, V]: the one leaving its last chunk; an empty sequence keeps h0."""
  N, n = lay["N"], lay["NT"]
  ce = lay["cend"]
  last = jnp.zeros((N,), jnp.int32).at[jnp.where(ce >= 0, ce, N)].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop")
  F = jnp.moveaxis(S_end[0][:, last], 1, 0)                # [N, H, K, V]
  return jnp.where(lay["empty"][:, None, None, None], h0, F)


def packed(cu_seqlens, T: int):
  """Per-token layout of the packed row for the token recurrence: (seq [T] int32, start [T],
  end [T], live [T]) -- the token's sequence, whether it is its first / last token, and
  whether it belongs to any sequence (t < cu_seqlens[-1])."""
  cu = jnp.asarray(cu_seqlens, jnp.int32)
  N = int(cu.shape[0]) - 1
  t = jnp.arange(T, dtype=jnp.int32)
  seq = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32), N - 1)
  live = t < cu[-1]
  return seq, live & (t == cu[seq]), live & (t == cu[seq + 1] - 1), live
