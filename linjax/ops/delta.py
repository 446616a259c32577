"""The delta rule: DeltaNet, gated DeltaNet (g given), negative eigenvalues (beta up to 2).

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * q_t S_t

q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; g: None or [B, T, H] (log decay <= 0);
state [B, H, K, V] float32. Keys are used as given (DeltaNet L2-normalises them beforehand).

Chunkwise form (WY / UT representation). Inside a chunk with chunk-local cumsum b of g and
start state S0, the "new values" u_t = beta_t (v_t - exp(g_t) k_t^T S_{t-1}) satisfy

    (I + L) U = diag(beta) V - diag(beta exp(b)) K S0,   L_tj = beta_t (k_t . k_j) exp(b_t - b_j), j < t

so with T = (I + L)^-1 (a unit lower-triangular solve in float32), W = T diag(beta exp(b)) K
and U0 = T diag(beta) V:  U = U0 - W S0,
    o = scale [ (q * exp(b)) S0 + tril(Q K^T * exp(b_i - b_j)) U ]
    S_end = exp(b_C) S0 + (K * exp(b_C - b))^T U  =  M S0 + Hc,
    M = exp(b_C) I - (K * exp(b_C - b))^T W,  Hc = (K * exp(b_C - b))^T U0.
"chunk" runs S_end = M S0 + Hc (through U) with lax.scan over chunks; "assoc_scan" composes
the affine maps (M, Hc) with jax.lax.associative_scan (K x K transitions); "parallel" is the
same with one chunk of length T. Every exp is of a number <= 0.

Packed rows (`segment_ids`): L and the scores are masked to same-segment pairs (so T is
block diagonal by segment), only tokens of the segment the entering state belongs to see
S0 (their rows of W and q exp(b)), only the chunk's last segment writes the leaving state,
and exp(b_C) S0 is dropped from it when the chunk holds a boundary.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax

from linjax.ops import varlen
from linjax.ops._checks import (check_beta, check_cu_seqlens_values, check_log_gates,
                                check_rank, step_inputs, step_state)
from linjax.ops._common import (F32, METHODS, check_segment_ids, chunk_segment_masks, dot,
                                by_method, masked_exp, pad_time, pallas_kernel,
                                segment_runs)
from linjax.ops.gla import SUB_CHUNK, _check_inputs, scan_tokens, segsum, suffix_sum


def delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None,
               output_final_state=False, cu_seqlens=None, method="auto", chunk_size=64,
               max_seqlen=None, segment_ids=None):
  """(Gated) delta rule. Returns (o [B, T, H, V] in v's dtype, final_state or None).

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] (in (0, 2) for negative eigenvalues).
    g: None or [B, T, H] log decay (<= 0): gated DeltaNet.
    Other arguments (segment_ids included) as `linjax.ops.gla`.
  """
  L = _check_inputs(q, k, v, None, initial_state, cu_seqlens, chunk_size, False, max_seqlen)
  # values: checked when concrete; traced ones only under traced_value_checks()
  check_beta(beta)
  check_log_gates(g)
  if cu_seqlens is not None:
    check_cu_seqlens_values(cu_seqlens, q.shape[1])
  B, T, H, K = q.shape
  if getattr(beta, "shape", None) != (B, T, H):
    raise ValueError(f"`beta` must have shape [B, T, H] = {(B, T, H)}, got "
                     f"{getattr(beta, 'shape', None)}")
  if not jnp.issubdtype(beta.dtype, jnp.floating):
    raise ValueError(f"`beta` must be a floating array, got dtype {beta.dtype}")
  if g is not None:
    if getattr(g, "shape", None) != (B, T, H):
      raise ValueError(f"`g` for delta_rule must have shape [B, T, H] = {(B, T, H)} (one decay "
                       f"per head), got {getattr(g, 'shape', None)}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
      raise ValueError(f"`g` must be a floating array (log decay <= 0), got {g.dtype}")
  scale = K ** -0.5 if scale is None else scale
  method = check_segment_ids(segment_ids, B, T, cu_seqlens, method)

  def run(method, a):
    runs = None if segment_ids is None else segment_runs(segment_ids)
    if cu_seqlens is None:
      o, S = _delta_dense(a["q"], a["k"], a["v"], a["beta"], a["g"], a["initial_state"],
                          scale=scale, method=method, chunk_size=chunk_size, runs=runs)
    else:
      o, S = _delta_varlen(a["q"], a["k"], a["v"], a["beta"], a["g"], a["initial_state"],
                           cu_seqlens, L, scale=scale, method=method, chunk_size=chunk_size)
    return o.astype(F32), (S if output_final_state else None)

  arrays = dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state,
                cu_seqlens=cu_seqlens, segment_ids=segment_ids)
  o, S = by_method(method, "delta_rule_chunk", arrays, dict(
      scale=scale, output_final_state=output_final_state, chunk_size=chunk_size), run)
  return o.astype(v.dtype), S


def delta_rule_step(state, q, k, v, beta, g=None, *, scale=None):
  """One decoding step: (state, token) -> (o_t, new_state).

  q, k: [B, H, K]; v: [B, H, V]; beta: [B, H]; g: None or [B, H]; state [B, H, K, V] float32
  or None. [B, 1, H, .] inputs (beta, g [B, 1, H]) are accepted and o keeps the time axis.
  """
  timed, q, k, v, beta, g = step_inputs("delta_rule_step", q, k, v, beta, g)
  B, H, K = q.shape
  if getattr(beta, "shape", None) != (B, H):
    raise ValueError(f"`beta` must have shape [B, H] = {(B, H)}, got {getattr(beta, 'shape', None)}")
  if g is not None and getattr(g, "shape", None) != (B, H):
    raise ValueError(f"`g` must have shape [B, H] = {(B, H)}, got {getattr(g, 'shape', None)}")
  V = v.shape[-1]
  scale = K ** -0.5 if scale is None else scale
  state = step_state(state, (B, H, K, V))
  S = _delta_token(state, k.astype(F32), v.astype(F32), beta.astype(F32),
                   None if g is None else g.astype(F32))
  o = (scale * jnp.einsum("bhk,bhkv->bhv", q.astype(F32), S)).astype(v.dtype)
  return (o[:, None] if timed else o), S


def _delta_token(S, kt, vt, bt, gt):
  if gt is not None:
    S = S * jnp.exp(gt)[..., None, None]
  pred = jnp.einsum("bhk,bhkv->bhv", kt, S)
  return S + bt[..., None, None] * kt[..., :, None] * (vt - pred)[..., None, :]


# ----------------------------------------------------------------------------- dense methods

def _delta_dense(q, k, v, beta, g, h0, *, scale, method, chunk_size, runs=None):
  B, T, H, K = q.shape
  V = v.shape[-1]
  h0 = jnp.zeros((B, H, K, V), F32) if h0 is None else h0.astype(F32)
  if method == "recurrent":
    return _delta_recurrent(q, k, v, beta, g, h0, scale, runs)
  if method == "parallel":
    C = max(T + (-T) % SUB_CHUNK, SUB_CHUNK)
    return _delta_chunked(q, k, v, beta, g, h0, scale, C, "none", runs)
  if method in ("chunk", "assoc_scan"):
    return _delta_chunked(q, k, v, beta, g, h0, scale, chunk_size,
                          "scan" if method == "chunk" else "assoc", runs)
  raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")


def _delta_varlen(q, k, v, beta, g, h0, cu_seqlens, L, *, scale, method, chunk_size):
  """Packed sequences (B = 1) by method, see `linjax.ops.varlen`."""
  _, T, H, K = q.shape
  N = varlen.num_seqs(cu_seqlens)
  h0 = jnp.zeros((N, H, K, v.shape[-1]), F32) if h0 is None else h0.astype(F32)
  if method == "recurrent":
    return _delta_recurrent(q, k, v, beta, g, None, scale,
                            seqs=(varlen.packed(cu_seqlens, T), h0))
  if method == "parallel" and varlen.concrete(cu_seqlens) is not None:
    up = lambda x: varlen.unpack(x, cu_seqlens, L)
    o, S = _delta_dense(up(q), up(k), up(v), up(beta), up(g), h0, scale=scale,
                        method=method, chunk_size=chunk_size)
    return varlen.repack(o, cu_seqlens, T), S
  lay = varlen.aligned(cu_seqlens, T, chunk_size)
  al = lambda x: varlen.to_aligned(lay, x)
  o, S_end = _delta_chunked(al(q), al(k), al(v), al(beta), al(g), None, scale, chunk_size,
                            "assoc" if method == "assoc_scan" else "scan",
                            starts=varlen.chunk_starts(lay, h0))
  return varlen.from_aligned(lay, o), varlen.finals(lay, S_end, h0)


def _delta_recurrent(q, k, v, beta, g, h0, scale, runs=None, seqs=None):
  """seqs: packed sequences (B = 1), as `linjax.ops.gla.scan_tokens`."""
  return scan_tokens(_delta_token, q, (k, v, beta, g), h0, scale, runs, seqs)


def _delta_chunked(q, k, v, beta, g, h0, scale, C, inter, runs=None, starts=None):
  """starts (the aligned varlen layout, B = 1): as `linjax.ops.gla._gla_chunked`; then the
  states leaving every chunk [1, H, n, K, V] are returned in place of the final state."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  q, k, v, beta, g = (pad_time(x, C) for x in (q, k, v, beta, g))
  n = q.shape[1] // C
  blk = lambda x: None if x is None else jnp.moveaxis(
      x.reshape((B, n, C) + x.shape[2:]), 3, 1)           # [B, H, n, C, (D)]
  q, k, v = blk(q), blk(k), blk(v)
  beta = blk(beta).astype(F32)                             # [B, H, n, C]
  cdt = q.dtype
  causal = jnp.tril(jnp.ones((C, C), bool))
  strict = jnp.tril(jnp.ones((C, C), bool), -1)
  sm = None if runs is None else chunk_segment_masks(runs, C)
  if sm is not None:
    causal, strict = causal & sm["same"], strict & sm["same"]

  kk = dot("bhnik,bhnjk->bhnij", k, k)
  qk = dot("bhnik,bhnjk->bhnij", q, k)
  if g is None:
    b = None
    L = jnp.where(strict, beta[..., :, None] * kk, 0.0)
    Aq = jnp.where(causal, qk, 0.0)
    eb = jnp.ones_like(beta)
    e_last = jnp.ones_like(beta)
  else:
    gb = blk(g).astype(F32)                                # [B, H, n, C]
    b = jnp.cumsum(gb, axis=-1)                            # chunk-local
    diff = segsum(gb)
    L = beta[..., :, None] * kk * masked_exp(diff, strict)
    Aq = qk * masked_exp(diff, causal)
    eb = jnp.exp(b)
    e_last = jnp.exp(suffix_sum(gb, -1))
  kf = k.astype(F32)
  if sm is not None:  # packed rows: see the module docstring
    eb = jnp.where(sm["carry"], eb, 0.0)
    e_last = jnp.where(sm["last"], e_last, 0.0)
  rhs = jnp.concatenate([(beta * eb)[..., None] * kf, beta[..., None] * v.astype(F32)], -1)
  # One copy of the UT inverse serves the jnp and Pallas paths; imported here (trace time) so
  # `import linjax.ops` does not load Pallas.
  from pallas_kernels._common import inv_unit_lower
  sol = dot("...ij,...jn->...in", inv_unit_lower(L), rhs)
  W, U0 = sol[..., :K], sol[..., K:]                       # [B,H,n,C,K], [B,H,n,C,V]
  q_dec = q.astype(F32) * eb[..., None]
  k_dec = kf * e_last[..., None]
  a_last = jnp.exp(b[..., -1]) if b is not None else jnp.ones(beta.shape[:-1], F32)
  if sm is not None:
    a_last = jnp.where(sm["through"], a_last, 0.0)

  def outputs(S0, W, U0, Aq, q_dec, k_dec, a):
    U = U0 - dot("...ck,...kv->...cv", W, S0)
    o = scale * (dot("...ck,...kv->...cv", q_dec, S0) + dot("...ij,...jv->...iv", Aq, U))
    S1 = a[..., None, None] * S0 + dot("...ck,...cv->...kv", k_dec, U)
    return o, S1

  if starts is not None:
    st, H0 = starts
    new = (st >= 0)[None, None, :, None, None]
    h0 = jnp.zeros((B, H, K, V), F32)
  if inter in ("scan", "none") or n == 1:
    mv = lambda x: jnp.moveaxis(x, 2, 0)

    def body(S, xs):
      if starts is None:
        o, S1 = outputs(S, *xs)
        return S1, o
      S = jnp.where(xs[-2] >= 0, xs[-1], S)
      o, S1 = outputs(S, *xs[:-2])
      return S1, (o, S1)

    xs = tuple(map(mv, (W, U0, Aq, q_dec, k_dec, a_last)))
    if starts is None:
      S_final, o = lax.scan(body, h0, xs)
    else:
      _, (o, S_end) = lax.scan(body, h0, xs + (st, mv(H0)))
      S_final = jnp.moveaxis(S_end, 0, 2)
    o = jnp.moveaxis(o, 0, 2)                              # [B, H, n, C, V]
  else:
    M = a_last[..., None, None] * jnp.eye(K, dtype=F32) - dot("...ck,...cj->...kj", k_dec, W)
    Hc = dot("...ck,...cv->...kv", k_dec, U0)

    def combine(x, y):  # apply x then y
      M1, H1 = x
      M2, H2 = y
      return (jnp.einsum("...ij,...jk->...ik", M2, M1),
              jnp.einsum("...ij,...jv->...iv", M2, H1) + H2)

    if starts is not None:  # a chunk starting a sequence maps everything to M h0 + Hc
      Hc = jnp.where(new, jnp.einsum("bhnij,bhnjv->bhniv", M, H0) + Hc, Hc)
      M = jnp.where(new, 0.0, M)
    Mp, Hp = lax.associative_scan(combine, (M, Hc), axis=2)
    S_end = jnp.einsum("bhnij,bhjv->bhniv", Mp, h0) + Hp
    S_start = jnp.concatenate([h0[:, :, None], S_end[:, :, :-1]], axis=2)
    if starts is not None:
      S_start = jnp.where(new, H0, S_start)
    o, _ = outputs(S_start, W, U0, Aq, q_dec, k_dec, a_last)
    S_final = S_end if starts is not None else S_end[:, :, -1]
  o = jnp.moveaxis(o, 1, 3).reshape(B, n * C, H, V)[:, :T]
  return o, S_final
