"""The gated linear family: linear attention, retention / Lightning / simple GLA, GLA.

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

q, k: [B, T, H, K]; v: [B, T, H, V]; state [B, H, K, V] float32 whatever the input dtype.
g (log forget gate, <= 0): None (plain linear attention), [B, T, H] (one decay per head) or
[B, T, H, K] (one per key channel, GLA).

Methods (one `method=` argument; all agree with `linjax.ops.reference.gla`):
  recurrent   lax.scan over tokens, state in float32.
  parallel    quadratic and masked: the chunk form below with a single chunk of length T.
  chunk       chunkwise: intra-chunk masked attention + a lax.scan over chunk states.
  assoc_scan  like chunk, but the chunk states come from jax.lax.associative_scan over the
              per-chunk affine maps (decay vector, state contribution).
  pallas      `pallas_kernels.gla_chunk` (GPU / TPU; interpret mode on CPU).
  auto        pallas on GPU / TPU, chunk on CPU, by the platform being compiled for (so a
              `jax.export` for cuda / tpu from a CPU host gets the kernel).

Numerics: gate cumulative sums are chunk-local and float32; every `exp` is of a number <= 0
(masks are applied before the exp). Per-channel gates use sub-chunks of 16 anchored inside
the chunk: off-diagonal sub-chunk blocks factor exp(b_i - b_j) = exp(b_i - b_p) exp(b_p - b_j)
at the token p just before the query sub-chunk (both factors <= 1), diagonal blocks form the
masked [16, 16, K] decay directly. Odd lengths are padded inside (k = v = g = 0 leaves the
state unchanged) and never visible outside.

Packed sequences (`cu_seqlens`, B = 1): see `linjax.ops.varlen` (a chunk-aligned layout for
the chunk methods and the kernels, T + N C tokens whether or not the offsets are traced).

Packed rows (`segment_ids` [B, T]): the state resets wherever the id changes. The chunk forms
mask the intra-chunk scores to same-segment pairs, feed the entering state only to the
chunk's tokens still in its segment, let only the chunk's last segment reach the state
leaving it, and cut the decay through a chunk that holds a boundary.

normalize=True (for positive feature maps) divides by the running key-sum denominator
scale * q_t z_t, z_t = exp(g_t) z_{t-1} + k_t. It is computed by running the op on v with a
column of ones appended: the state is then [B, H, K, V + 1] and its last column is z. Pass
and expect that [.., V + 1] state as `initial_state` / final state (and to `gla_step`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linjax.ops import varlen
from linjax.ops._checks import (check_cu_seqlens_values, check_log_gates, check_rank,
                                step_inputs, step_state)
from linjax.ops._common import (F32, METHODS, check_segment_ids, chunk_segment_masks, dot,
                                by_method, masked_exp, pad_time, pallas_kernel,
                                segment_runs)

SUB_CHUNK = 16


# ----------------------------------------------------------------------------- checks

def _check_inputs(q, k, v, g, initial_state, cu_seqlens, chunk_size, normalize, max_seqlen,
                  extra_v=0):
  check_rank("q", q, 4, "[B, T, H, K]")
  B, T, H, K = q.shape
  if getattr(k, "shape", None) != q.shape:
    raise ValueError(f"`k` must have shape [B, T, H, K] = {q.shape} like q, got "
                     f"{getattr(k, 'shape', None)}")
  check_rank("v", v, 4, "[B, T, H, V]")
  if v.shape[:3] != (B, T, H):
    raise ValueError(f"`v` must have shape [B, T, H, V] = ({B}, {T}, {H}, V), got {v.shape}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"`{name}` must be a floating array, got dtype {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"`q`, `k`, `v` must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if g is not None:
    if getattr(g, "shape", None) not in ((B, T, H), (B, T, H, K)):
      raise ValueError(f"`g` must have shape [B, T, H] = {(B, T, H)} or [B, T, H, K] = "
                       f"{(B, T, H, K)}, got {getattr(g, 'shape', None)}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
      raise ValueError(f"`g` must be a floating array (log forget gate <= 0), got {g.dtype}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
  if cu_seqlens is not None:
    L = varlen.check_cu_seqlens(cu_seqlens, T, B, max_seqlen)
    N = varlen.num_seqs(cu_seqlens)
  else:
    L, N = None, B
  V = v.shape[-1] + extra_v
  if initial_state is not None:
    want = (N, H, K, V)
    if getattr(initial_state, "shape", None) != want:
      what = "[N, H, K, V]" if cu_seqlens is not None else "[B, H, K, V]"
      if normalize:
        what = what[:-2] + "V + 1] (normalize=True keeps the key sum as a last column)"
      raise ValueError(f"`initial_state` must have shape {what} = {want}, got "
                       f"{getattr(initial_state, 'shape', None)}")
  return L


# ----------------------------------------------------------------------------- public op

def gla(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, method="auto", chunk_size=64, normalize=False, max_seqlen=None,
        eps=1e-6, segment_ids=None):
  """Gated linear attention. Returns (o [B, T, H, V] in v's dtype, final_state or None).

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V].
    g: None, [B, T, H] or [B, T, H, K] log forget gate (<= 0).
    scale: defaults to K ** -0.5.
    initial_state: [B, H, K, V] (or [N, H, K, V] with cu_seqlens; V + 1 with normalize).
    output_final_state: return the float32 final state.
    cu_seqlens: [N + 1] int offsets of a packed batch (B = 1); the state resets per sequence.
    method: one of METHODS. chunk_size: chunk length for chunk / assoc_scan / pallas.
    normalize: divide by the decayed key-sum denominator (positive feature maps only).
    max_seqlen: longest packed sequence (default: computed from concrete cu_seqlens, else T).
    eps: added to the normalize denominator.
    segment_ids: [B, T] int ids of documents packed in each row (padding may use its own
      id); the state resets wherever the id changes. `initial_state` feeds each row's first
      segment; the final state is its last segment's.
  """
  L = _check_inputs(q, k, v, g, initial_state, cu_seqlens, chunk_size, normalize, max_seqlen,
                    extra_v=1 if normalize else 0)
  # values: checked when concrete; traced ones only under traced_value_checks()
  check_log_gates(g)
  if cu_seqlens is not None:
    check_cu_seqlens_values(cu_seqlens, q.shape[1])
  K = q.shape[-1]
  scale = K ** -0.5 if scale is None else scale
  method = check_segment_ids(segment_ids, *q.shape[:2], cu_seqlens, method)
  out_dtype = v.dtype
  V = v.shape[-1]
  if normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)

  def run(method, a):
    runs = None if segment_ids is None else segment_runs(segment_ids)
    if cu_seqlens is None:
      o, S = _gla_dense(a["q"], a["k"], a["v"], a["g"], a["initial_state"], scale=scale,
                        method=method, chunk_size=chunk_size, runs=runs)
    else:
      o, S = _gla_varlen(a["q"], a["k"], a["v"], a["g"], a["initial_state"], cu_seqlens, L,
                         scale=scale, method=method, chunk_size=chunk_size)
    return o.astype(F32), (S if output_final_state else None)

  arrays = dict(q=q, k=k, v=v, g=g, initial_state=initial_state, cu_seqlens=cu_seqlens,
                segment_ids=segment_ids)
  o, S = by_method(method, "gla_chunk", arrays, dict(
      scale=scale, output_final_state=output_final_state, chunk_size=chunk_size), run)
  if normalize:
    o = o[..., :V] / (o[..., V:] + eps)
  return o.astype(out_dtype), S


def gla_step(state, q, k, v, g=None, *, scale=None, normalize=False, eps=1e-6):
  """One decoding step: (state, token) -> (o_t, new_state).

  q, k: [B, H, K]; v: [B, H, V]; g: None, [B, H] or [B, H, K]; state: [B, H, K, V] float32
  ([B, H, K, V + 1] with normalize=True) or None for zeros. A single-token time axis
  ([B, 1, H, .] inputs, g [B, 1, H(, K)]) is accepted too and kept in o.
  Returns o ([B, H, V] or [B, 1, H, V], v's dtype) and the float32 state.
  """
  timed, q, k, v, g = step_inputs("gla_step", q, k, v, g)
  B, H, K = q.shape
  if g is not None and getattr(g, "shape", None) not in ((B, H), (B, H, K)):
    raise ValueError(f"`g` must have shape [B, H] or [B, H, K] = {(B, H, K)}, got "
                     f"{getattr(g, 'shape', None)}")
  scale = K ** -0.5 if scale is None else scale
  V = v.shape[-1]
  out_dtype = v.dtype
  if normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  state = step_state(state, (B, H, K, v.shape[-1]),
                     f"[B, H, K, V{' + 1' if normalize else ''}]")
  S = _gla_token(state, k.astype(F32), v.astype(F32),
                 None if g is None else g.astype(F32))
  o = scale * jnp.einsum("bhk,bhkv->bhv", q.astype(F32), S)
  if normalize:
    o = o[..., :V] / (o[..., V:] + eps)
  o = o.astype(out_dtype)
  return (o[:, None] if timed else o), S


def _gla_token(S, kt, vt, gt):
  """One token of the GLA recurrence on an fp32 state [B, H, K, V]: decay (per head [B, H] or
  per key [B, H, K]), then add k v^T."""
  if gt is not None:
    decay = jnp.exp(gt)
    S = S * (decay[..., None, None] if decay.ndim == 2 else decay[..., None])
  return S + kt[..., :, None] * vt[..., None, :]


# ----------------------------------------------------------------------------- dense methods

def _gla_dense(q, k, v, g, h0, *, scale, method, chunk_size, runs=None):
  """Dense batch (no cu_seqlens; runs = segment_runs(segment_ids) or None).
  Returns (o float32, final state float32)."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  h0 = jnp.zeros((B, H, K, V), F32) if h0 is None else h0.astype(F32)
  if method == "recurrent":
    return _gla_recurrent(q, k, v, g, h0, scale, runs)
  if method == "parallel":
    C = max(T + (-T) % SUB_CHUNK, SUB_CHUNK)
    return _gla_chunked(q, k, v, g, h0, scale, C, "none", runs)
  if method in ("chunk", "assoc_scan"):
    return _gla_chunked(q, k, v, g, h0, scale, chunk_size,
                        "scan" if method == "chunk" else "assoc", runs)
  raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")


def _gla_varlen(q, k, v, g, h0, cu_seqlens, L, *, scale, method, chunk_size):
  """Packed sequences (B = 1) by method, see `linjax.ops.varlen`. Returns (o float32 [1, T,
  H, V], final states [N, H, K, V])."""
  _, T, H, K = q.shape
  N = varlen.num_seqs(cu_seqlens)
  h0 = jnp.zeros((N, H, K, v.shape[-1]), F32) if h0 is None else h0.astype(F32)
  if method == "recurrent":
    return _gla_recurrent(q, k, v, g, None, scale, seqs=(varlen.packed(cu_seqlens, T), h0))
  if method == "parallel" and varlen.concrete(cu_seqlens) is not None:
    up = lambda x: varlen.unpack(x, cu_seqlens, L)
    o, S = _gla_dense(up(q), up(k), up(v), up(g), h0, scale=scale, method=method,
                      chunk_size=chunk_size)
    return varlen.repack(o, cu_seqlens, T), S
  lay = varlen.aligned(cu_seqlens, T, chunk_size)
  al = lambda x: varlen.to_aligned(lay, x)
  o, S_end = _gla_chunked(al(q), al(k), al(v), al(g), None, scale, chunk_size,
                          "assoc" if method == "assoc_scan" else "scan",
                          starts=varlen.chunk_starts(lay, h0))
  return varlen.from_aligned(lay, o), varlen.finals(lay, S_end, h0)


def _gla_recurrent(q, k, v, g, h0, scale, runs=None, seqs=None):
  return scan_tokens(_gla_token, q, (k, v, g), h0, scale, runs, seqs)


def scan_tokens(update, q, xs, h0, scale, runs=None, seqs=None):
  """The token-by-token form of a linear recurrence: `update(S, *x_t) -> S` per token (each x
  [B, T, H, ...] or None, in fp32), then o_t = scale * q_t S_t. runs: segment runs [B, T]
  (the state resets where a segment starts) or None. seqs (packed sequences, B = 1):
  ((seq, start, end, live) per token, H0 [N, H, K, V]): each sequence starts from its H0 row,
  the N final states are returned instead of the last state, and zeros after the last
  sequence."""
  tm = lambda x: None if x is None else jnp.moveaxis(x.astype(F32), 1, 0)
  new = None if runs is None else jnp.moveaxis(resets(runs), 1, 0)
  T = q.shape[1]
  if seqs is not None:
    (seq, start, end, live), H0 = seqs
    h0 = jnp.zeros((1,) + H0.shape[1:], F32)

  def body(carry, inputs):
    S, fin = carry
    t, qt, rt, xt = inputs
    if rt is not None:
      S = jnp.where(rt[:, None, None, None], 0.0, S)
    if seqs is not None:
      S = jnp.where(start[t], H0[seq[t]][None], S)
    S = update(S, *xt)
    o = scale * jnp.einsum("bhk,bhkv->bhv", qt, S)
    if seqs is not None:
      fin = fin.at[seq[t]].set(jnp.where(end[t], S[0], fin[seq[t]]))
      o = jnp.where(live[t], o, 0.0)
    return (S, fin), o

  fin0 = None if seqs is None else H0
  (S, fin), o = lax.scan(body, (h0, fin0),
                         (jnp.arange(T), tm(q), new, tuple(tm(x) for x in xs)))
  return jnp.moveaxis(o, 0, 1), (S if seqs is None else fin)


def resets(runs):
  """[B, T] bool: the state resets before token t (a new segment starts there, t > 0)."""
  return jnp.concatenate([jnp.zeros_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], 1)


def _gla_chunked(q, k, v, g, h0, scale, C, inter, runs=None, starts=None):
  """Chunkwise form. inter: 'scan' (lax.scan over chunks), 'assoc' (associative scan) or
  'none' (a single chunk: the parallel form). runs: segment runs [B, T] or None.
  starts (the aligned varlen layout, B = 1): (cstart [n], per-chunk initial states
  [1, H, n, K, V]); then the states leaving every chunk [1, H, n, K, V] are returned in
  place of the final state."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  q, k, v, g = (pad_time(x, C) for x in (q, k, v, g))
  n = q.shape[1] // C
  # [B, T, H, D] -> [B, H, n, C, D]
  blk = lambda x: None if x is None else jnp.moveaxis(
      x.reshape((B, n, C) + x.shape[2:]), 3, 1)
  q, k, v = blk(q), blk(k), blk(v)
  cdt = q.dtype
  causal = jnp.tril(jnp.ones((C, C), bool))
  sm = None if runs is None else chunk_segment_masks(runs, C)
  vis = causal if sm is None else causal & sm["same"]

  if g is None:
    A = jnp.where(vis, dot("bhnik,bhnjk->bhnij", q, k), 0.0)
    q_dec, k_dec, a = q, k, None
  elif g.ndim == 3:                                       # per head
    gb = blk(g).astype(F32)                               # [B,H,n,C]
    b = jnp.cumsum(gb, axis=-1)                           # chunk-local
    A = dot("bhnik,bhnjk->bhnij", q, k) * masked_exp(segsum(gb), vis)
    q_dec = (q * jnp.exp(b)[..., None]).astype(cdt)
    k_dec = (k * jnp.exp(suffix_sum(gb, -1))[..., None]).astype(cdt)
    a = jnp.exp(b[..., -1])[..., None, None]             # [B,H,n,1,1]
  else:                                                   # per channel
    gb = blk(g).astype(F32)                               # [B,H,n,C,K]
    b = jnp.cumsum(gb, axis=-2)
    A = _intra_per_channel(q, k, gb, C)
    if sm is not None:
      A = jnp.where(sm["same"], A, 0.0)
    q_dec = (q * jnp.exp(b)).astype(cdt)
    k_dec = (k * jnp.exp(suffix_sum(gb, -2))).astype(cdt)
    a = jnp.exp(b[..., -1, :])[..., None]                # [B,H,n,K,1]

  if a is None:
    a = jnp.ones((1, 1, 1, 1, 1), F32)
  if sm is not None:  # packed rows: see the module docstring
    q_dec = jnp.where(sm["carry"][..., None], q_dec, 0)
    k_dec = jnp.where(sm["last"][..., None], k_dec, 0)
    a = jnp.where(sm["through"][..., None, None], a, 0.0)
  o_intra = dot("bhnij,bhnjv->bhniv", A.astype(cdt), v)
  Hc = dot("bhnjk,bhnjv->bhnkv", k_dec, v)                # chunk's own state contribution

  if starts is not None:
    h0 = jnp.zeros(Hc.shape[:2] + Hc.shape[3:], F32)
  S_start, S_end = _chunk_states(a, Hc, h0, inter, starts)  # [B,H,n,K,V], [B,H,n|1,K,V]
  o = scale * (dot("bhnik,bhnkv->bhniv", q_dec, S_start.astype(cdt)) + o_intra)
  o = jnp.moveaxis(o, 1, 3).reshape(B, n * C, H, V)[:, :T]
  return o, (S_end if starts is not None else S_end[:, :, -1])


def _chunk_states(a, Hc, h0, inter, starts=None):
  """States entering every chunk and leaving it (every chunk with `starts`, else the last
  one only, [B, H, 1, K, V]) given S_end = a * S_start + Hc (a broadcasts).
  starts: (cstart [n], initial states [B, H, n, K, V]): a chunk with cstart >= 0 starts a
  sequence, its entering state is replaced by that initial state."""
  n = Hc.shape[2]
  a = jnp.broadcast_to(a, Hc.shape[:3] + a.shape[3:])
  if starts is not None:
    st, H0 = starts
    new = (st >= 0)[None, None, :, None, None]
  if (inter == "none" or n == 1) and starts is None:
    return h0[:, :, None], (a[:, :, 0] * h0 + Hc[:, :, 0])[:, :, None]
  if inter in ("scan", "none"):
    def body(S, xs):
      ac, hc = xs[:2]
      if starts is None:
        return ac * S + hc, S
      S = jnp.where(xs[2] >= 0, xs[3], S)
      S1 = ac * S + hc
      return S1, (S, S1)
    xs = (jnp.moveaxis(a, 2, 0), jnp.moveaxis(Hc, 2, 0))
    if starts is None:
      S_final, S_start = lax.scan(body, h0, xs)
      return jnp.moveaxis(S_start, 0, 2), S_final[:, :, None]
    _, (S_start, S_end) = lax.scan(body, h0, xs + (st, jnp.moveaxis(H0, 2, 0)))
    return jnp.moveaxis(S_start, 0, 2), jnp.moveaxis(S_end, 0, 2)
  # associative scan over affine maps S -> a S + h; a chunk that starts a sequence maps
  # everything to its constant a h0 + h
  if starts is not None:
    Hc = jnp.where(new, a * H0 + Hc, Hc)
    a = jnp.where(new, 0.0, a)

  def combine(x, y):
    a1, h1 = x
    a2, h2 = y
    return a1 * a2, a2 * h1 + h2
  ap, hp = lax.associative_scan(combine, (a, Hc), axis=2)
  S_end = ap * h0[:, :, None] + hp
  S_start = jnp.concatenate([h0[:, :, None], S_end[:, :, :-1]], axis=2)
  if starts is not None:
    S_start = jnp.where(new, H0, S_start)
  return S_start, S_end


def segsum(g, axis=-1):
  """out[..., i, j] = sum_{j < l <= i} g_l along `axis` (0 for i <= j), each entry its own
  running sum (no difference of long cumsums, so no cancellation). New axes i, j replace
  `axis` (at -2, -1 for axis=-1; at -3, -2 for axis=-2, the channel axis last)."""
  if axis == -1:
    C = g.shape[-1]
    x = jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), g[..., :, None], 0.0)
    return jnp.cumsum(x, axis=-2)
  C = g.shape[-2]
  x = jnp.where(jnp.tril(jnp.ones((C, C), bool), -1)[:, :, None], g[..., :, None, :], 0.0)
  return jnp.cumsum(x, axis=-3)


def suffix_sum(g, axis):
  """out_j = sum_{l > j} g_l along `axis` (exclusive reverse cumsum)."""
  rc = lax.cumsum(g, axis=axis % g.ndim, reverse=True)
  rc = jnp.moveaxis(rc, axis, -1)
  rc = jnp.concatenate([rc[..., 1:], jnp.zeros_like(rc[..., :1])], -1)
  return jnp.moveaxis(rc, -1, axis)


def _intra_per_channel(q, k, g, C):
  """A_ij = sum_k q_ik k_jk exp(b_ik - b_jk) for j <= i inside each chunk, float32, where
  b_i - b_j = sum_{j < l <= i} g_l.

  Sub-chunks of s = 16: a diagonal block uses the masked [s, s, K] decay; an off-diagonal
  block factors the decay at the token p just before the query sub-chunk,
  exp(sum_{p < l <= i} g) * exp(sum_{j < l <= p} g), both <= 1, each a direct running sum
  (a cumsum inside the query sub-chunk, a reverse cumsum from p over the keys), so long
  chunks (the parallel form) lose no precision to cancellation.
  With s = 16 the diagonal blocks run one key column at a time, so their [s, s, K] decays
  (16x a key tensor; at T = 16k, 576 MiB per instance for SmolLM2's 9 heads) never exist
  at once.
  """
  s = SUB_CHUNK if C % SUB_CHUNK == 0 else C
  m = C // s
  lead = q.shape[:3]
  K = q.shape[-1]
  qs = q.reshape(lead + (m, s, K)).astype(F32)
  ks = k.reshape(lead + (m, s, K)).astype(F32)
  gs = g.reshape(lead + (m, s, K))
  if s <= SUB_CHUNK:
    # diagonal blocks, one key column j at a time (a block's [s, s, K] decay is never
    # whole): dec_j[i] = exp(sum_{j < l <= i} g_l) for i >= j, the running sums of `segsum`
    idx = jnp.arange(s)
    cols = []
    for j in range(s):
      dec = masked_exp(jnp.cumsum(jnp.where((idx > j)[:, None], gs, 0.0), axis=-2),
                       (idx >= j)[:, None])                        # [.., m, s, K]
      cols.append(jnp.sum(qs * ks[..., j:j + 1, :] * dec, -1))     # [.., m, s]
    diag = jnp.stack(cols, -1)                                     # [.., m, s, s]
  else:   # one block of a chunk length that 16 does not divide: the [s, s, K] decay
    tri = jnp.tril(jnp.ones((s, s), bool))[:, :, None]
    dec = masked_exp(segsum(gs, axis=-2), tri)
    diag = jnp.einsum("...ik,...jk,...ijk->...ij", qs, ks, dec)    # [.., m, s, s]
  if m == 1:
    return diag.reshape(lead + (C, C))
  q_off = qs * jnp.exp(jnp.cumsum(gs, axis=-2))                     # [.., m, s, K], <= 1
  j = jnp.arange(C)
  before = (j[None, :] < (jnp.arange(m) * s)[:, None])[..., None]   # [m, C, 1]: j <= p_a
  # r[a, j] = sum_{j < l <= p_a} g_l: reverse cumsum of g masked to l <= p_a
  x = jnp.where(before, g[..., None, :, :], 0.0)                    # [.., m, C, K]
  r = suffix_sum(x, -2)
  k_off = k.astype(F32)[..., None, :, :] * masked_exp(r, before)    # [.., m, C, K]
  off = dot("...ask,...ajk->...asj", q_off.astype(q.dtype), k_off.astype(q.dtype))
  off = off.reshape(lead + (m, s, m, s))
  # (`off + diag * eye` crashes XLA:CPU's compiler in the backward for m = 2; `where` does not.)
  same = jnp.arange(m)[:, None, None, None] == jnp.arange(m)[None, None, :, None]
  A = jnp.where(same, jnp.broadcast_to(diag[..., :, :, None, :], off.shape), off)
  return A.reshape(lead + (C, C))
