"""Chunkwise gated linear attention (no gate / per-head gate / per-channel GLA gate) in Pallas.

  S_t = exp(g_t) * S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t      (linjax/ops/reference.py)

In the kernel layout of `_common.py` (chunk size C, b = chunk-local fp32 cumsum of g, h_c the
state entering chunk c):
  state update   h_{c+1} = exp(b_last) h_c + (k * exp(b_last - b))^T v
  chunk output   o = scale (q * exp(b)) h_c + scale [(q k^T) * exp(b_i - b_j)]_{j <= i} v

Forward, two forms of the same step functions (`tiling.use_fused` picks one by shape):
  fused      one sequential pass per (batch, head, V tile): the state stays in registers
             (GPU: a loop over chunks inside one program) or VMEM (TPU: an "arbitrary" grid
             axis with a scratch buffer), each chunk's o is written directly, and no chunk
             state is stored. IO: q, k, v read and o written once.
  two-pass   `state_pass` writes every chunk state h_c (input dtype), then `output` computes
             every chunk in parallel from it. IO: also the chunk states, written and read once
             (2 K V / C values per token and head, about two q's worth at K = V = 128, C = 64);
             wins when B * H (the fused form's parallelism) is too small to fill a GPU.
  Rule (`tiling.use_fused`): TPU always fused; GPU fused when B * H * V tiles >= 64.
Neither form keeps anything for the backward but its inputs: the backward recomputes the
chunk states (as fla's chunk kernels do), so activation memory is independent of T / C.

Backward (custom_vjp): three kernels, every state in fp32:
  1. `state_pass` again, writing h_c in fp32;
  2. `state_pass` in reverse from dS_T: dh_c (the gradient of the state leaving chunk c) in
     fp32, and dh0;
  3. `grads`, every chunk in parallel: dq, dk, dv in the input dtype, and the gate gradient.
The gate gradient is chunk-local, as in fla: with every quantity of chunk c a function of the
chunk-local cumsum b (h_c fixed, h_{c+1} an output),
      dL/db_s = q_s . dq_s - k_s . dk_s + [s = last] * h_{c+1} . dh_{c+1},
      h_{c+1} . dh_{c+1} = exp(b_last) sum(h_c * dh_{c+1}) + sum_j k_j . dk_j(state part),
and dL/dg_t = sum over s >= t in the chunk (a reverse cumsum inside the chunk; in-kernel
for per-channel gates, on the [B, T, H] column outside for per-head gates). The cross-chunk
part is a single fp32 sum(h * dh): no reverse cumsum over the whole sequence, whose terms
cancel (that cancellation made bf16 gate gradients 2-15x worse than the jnp chunk method).

Per-channel gates never form exp of a positive number: chunks are split into sub-chunks of
16 (fla's chunk_gla layout). A query sub-chunk's scores against earlier keys are one matmul
of q exp(g - g_p) by k exp(g_p - g) (p the token before the sub-chunk, both factors <= 1);
the diagonal [16, 16] block is built one key column at a time with the decay masked before
the exp. In the backward, dk of a key sub-chunk comes from the later queries anchored at the
sub-chunk's last token (q exp(g - g_n) and exp(g_n - g), both <= 1). Every sub-chunk's rows
of o, dq, dk, dv, dg are written straight into the output refs (no assembly of [C, C]
blocks, no selection matmuls).

Packed rows (segment_ids [B, T]; the state resets wherever the id changes): each token
carries its segment run counted from the run of the state entering its chunk
(`segment_arrays`), and `_gview` turns that into four masks: same-segment pairs in the
intra-chunk scores, only the entering run reads h_c, only the chunk's last run writes
h_{c+1}, and the decay of h_c through the chunk is cut at a boundary. The gate identity
above holds with the masks (every surviving term is a function of b_i - b_j, b_i, b_last - b_j
or b_last inside one segment).

Varlen (cu_seqlens): `_common.aligned_layout` starts every sequence on a chunk boundary
(T + N C tokens at most, never N T); the sequential kernels then take per-chunk flags
(cstart / cend: the sequence a chunk starts / ends) and all N initial / final states of the
head: a chunk that starts sequence n loads h0_n, one that ends it stores the state (the
reverse pass the same way round with dS_T and dh0). The parallel kernels need nothing: every
chunk holds one sequence.

Lowerings: every kernel runs G chunks per block, a loop inside the program (`_loop`). GPU
(Pallas Triton): sequential passes take the whole row (G = NT) in one program per (batch,
head, K tile, V tile); parallel passes one chunk per program. TPU (Pallas Mosaic): G chunks
per grid step (`tiling.chunks_per_step`, so T = 32k is <= 1k grid steps), the state carried
between steps in a VMEM scratch buffer. Block sizes come from `tiling.py`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common as cm
from pallas_kernels import tiling

f32 = jnp.float32
NEG_INF = float("-inf")
SUB = 16  # sub-chunk of the per-channel intra-chunk scores


# --------------------------------------------------------------------------- matmuls

def _mm(a, b, dims):
  # fp32 inputs: full precision (no TF32 on GPU), so fp32 results match the reference.
  prec = lax.Precision.HIGHEST if (a.dtype == f32 or b.dtype == f32) else None
  return lax.dot_general(a, b, (dims, ((), ())), precision=prec, preferred_element_type=f32)


def _dot(a, b):
  return _mm(a, b, ((1,), (0,)))


def _dot_tn(a, b):  # a^T b
  return _mm(a, b, ((0,), (0,)))


def _dot_nt(a, b):  # a b^T
  return _mm(a, b, ((1,), (1,)))


def sdot(a, b, dims, hp, backend, dt):
  """A matmul on the state path. hp (the delta rule's sequential passes): fp32 operands,
  full precision (GPU: three bf16 passes on the tensor cores, BF16_BF16_F32_X3; TPU: fp32
  HIGHEST); else operands in dt (the input dtype), fp32 accumulation."""
  if not hp or dt == f32:
    return _mm(a.astype(dt), b.astype(dt), dims)
  prec = (lax.DotAlgorithmPreset.BF16_BF16_F32_X3 if backend == "gpu"
          else lax.Precision.HIGHEST)
  return lax.dot_general(a.astype(f32), b.astype(f32), (dims, ((), ())), precision=prec,
                         preferred_element_type=f32)


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def col_to_row(x):
  """[n, 1] -> [1, n] by a masked reduction (exact; no transpose needed by the lowering)."""
  n = x.shape[0]
  return jnp.sum(jnp.where(_iota((n, n), 0) == _iota((n, n), 1), x, 0.0), axis=0,
                 keepdims=True)


def rev_cumsum_rows(x, backend):
  """Reverse cumsum over axis 0 of an fp32 [n, d] block: out_i = sum_{j >= i} x_j.
  GPU / interpret: Triton's scan (x - cumsum + total); TPU (no cumsum lowering): a 0/1
  upper-triangular matmul at full fp32 precision."""
  if backend == "tpu":
    n = x.shape[0]
    tri = (_iota((n, n), 1) >= _iota((n, n), 0)).astype(f32)
    return lax.dot_general(tri, x, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=f32)
  return x - jnp.cumsum(x, axis=0) + jnp.sum(x, axis=0, keepdims=True)


# --------------------------------------------------------------------------- one chunk

@dataclasses.dataclass
class Ck:
  """One chunk inside a kernel block: rows [base, base + C) of the token refs, index j of the
  per-chunk refs (gate rows / last-row columns, segment rows). g: the gate refs (scalar:
  bcol [rows, 1], brow [chunks, 1, C]; channel: gc [rows, BK], gcol [chunks, BK, 1]); seg:
  the segment-run refs (rcol [rows, 1], rrow [chunks, 1, C]) or None."""
  kind: str
  C: int
  base: object
  j: object
  g: tuple = ()
  seg: tuple | None = None

  def rows(self, lo=0, n=None):
    return pl.ds(self.base + lo, self.C if n is None else n)


def gview(ck):
  """Gate (and segment) quantities of one chunk, loaded from its refs.

  scalar: bcol [C,1], brow [1,C], blast [1,1];  channel: gc [C,BK], glast [1,BK], gcol [BK,1]
  segments: rcol [C,1] / rrow [1,C] f32 runs relative to the entering state's run, and masks
    same [C,C] (i, j in one segment), carry [C,1] (token sees the entering state),
    last [C,1] (token reaches the leaving state), through [1,1] (no boundary in the chunk).
  """
  C = ck.C
  gv = {}
  if ck.kind == "scalar":
    bcol, brow = ck.g[0][ck.rows()], ck.g[1][ck.j]
    gv = dict(bcol=bcol, brow=brow, blast=ck.g[0][ck.rows(C - 1, 1)])
  elif ck.kind == "channel":
    gv = dict(gc=ck.g[0][ck.rows()], glast=ck.g[0][ck.rows(C - 1, 1)], gcol=ck.g[1][ck.j])
  if ck.seg is not None:
    rcol, rrow = ck.seg[0][ck.rows()], ck.seg[1][ck.j]
    rlast = ck.seg[0][ck.rows(C - 1, 1)]
    gv.update(rcol=rcol, rrow=rrow, same=rcol == rrow, carry=rcol == 0.0, last=rcol == rlast,
              through=rlast == 0.0)
  return gv


def _mask(x, gv, name):
  """x where the segment mask `name` holds, 0 elsewhere (no-op without segments)."""
  return jnp.where(gv[name], x, 0.0) if name in gv else x


def to_end(x, kind, gv, g=None):
  """x * exp(b_last - b): decay rows to the end of their chunk (x [C, BK] f32); rows outside
  the chunk's last segment do not reach the leaving state. g: the gate rows of x (channel)."""
  if kind == "scalar":
    x = x * jnp.exp(gv["blast"] - gv["bcol"])
  elif kind == "channel":
    x = x * jnp.exp(gv["glast"] - (gv["gc"] if g is None else g))
  return _mask(x, gv, "last")


def from_start(x, kind, gv):
  """x * exp(b): decay from the chunk start (x [C, BK] f32); rows outside the segment of
  the entering state do not see it."""
  if kind == "scalar":
    x = x * jnp.exp(gv["bcol"])
  elif kind == "channel":
    x = x * jnp.exp(gv["gc"])
  return _mask(x, gv, "carry")


def decay_state(h, kind, gv):
  if kind == "scalar":
    h = h * jnp.exp(gv["blast"])
  elif kind == "channel":
    h = h * jnp.exp(gv["gcol"])
  return _mask(h, gv, "through")


def causal(C, gv=None):
  """[C, C] bool: j <= i (and, for packed rows, i and j in one segment)."""
  mask = _iota((C, C), 0) >= _iota((C, C), 1)
  return mask & gv["same"] if gv is not None and "same" in gv else mask


def scalar_decay(kind, gv, C):
  """[C, C] f32 decay matrix exp(b_i - b_j) on i >= j, 0 above (mask before exp)."""
  mask = causal(C, gv)
  if kind == "none":
    return jnp.where(mask, 1.0, 0.0).astype(f32)
  return jnp.exp(jnp.where(mask, gv["bcol"] - gv["brow"], NEG_INF))


def state_update(h, x, y, kind, gv, reverse, scale, dt, hp=False, backend="gpu"):
  """h_{c+1} = decay h_c + (k exp(b_last - b))^T v (forward, x = k, y = v) or
  dh_c = decay dh_{c+1} + scale (q exp(b))^T do (reverse, x = q, y = do)."""
  xf = x.astype(f32)
  xd = from_start(xf, kind, gv) * scale if reverse else to_end(xf, kind, gv)
  return decay_state(h, kind, gv) + sdot(xd, y, ((0,), (0,)), hp, backend, dt)


def out_scalar(q, k, y, h, kind, gv, C, scale, dt):
  """o of one chunk, scalar / no gate: scale [(q exp(b)) h + A y]; y [C, BV], h [K, BV]."""
  a = _dot_nt(q, k) * scalar_decay(kind, gv, C)
  qg = from_start(q.astype(f32), kind, gv)
  return (_dot(qg.astype(dt), h.astype(dt)) + _dot(a.astype(dt), y.astype(dt))) * scale


def _diag(ck, q_ref, k_ref, lo, s, qa, ga, ra=None, dA=None):
  """Diagonal [s, s] block of a per-channel chunk: D_ij = sum_k q_ik k_jk exp(g_ik - g_jk)
  (j <= i in sub-chunk rows lo.., same segment), one key column at a time with the decay
  masked before the exp ([s, K] exps per column). qa, ga: the sub-chunk's q (f32) and gate
  rows; ra: its segment runs [s, 1]. With dA (dL/dD [s, s], masked): also dq, dk [s, K]."""
  rows_s = _iota((s, 1), 0)
  cols_ss = _iota((s, s), 1)
  gc_ref = ck.g[0]
  grads = dA is not None

  def body(r, carry):
    kj = k_ref[ck.rows(lo + r, 1), :].astype(f32)                     # [1, K]
    gj = gc_ref[ck.rows(lo + r, 1), :]
    ok = rows_s >= r
    if ra is not None:
      ok = ok & (ra == ck.seg[0][ck.rows(lo + r, 1), :])
    e = jnp.exp(jnp.where(ok, ga - gj, NEG_INF))                       # [s, K]
    qe = qa * e
    col = jnp.sum(qe * kj, axis=1, keepdims=True)                       # [s, 1]
    D = carry[0] + jnp.where(cols_ss == r, col, 0.0)
    if not grads:
      return (D,)
    _, dqa, dka = carry
    dpc = jnp.sum(jnp.where(cols_ss == r, dA, 0.0), axis=1, keepdims=True)
    dqa = dqa + dpc * kj * e
    dka = dka + jnp.where(rows_s == r, jnp.sum(dpc * qe, axis=0, keepdims=True), 0.0)
    return (D, dqa, dka)

  K = qa.shape[-1]
  init = (jnp.zeros((s, s), f32),)
  if grads:
    init += (jnp.zeros((s, K), f32), jnp.zeros((s, K), f32))
  return lax.fori_loop(0, s, body, init)


def _same_block(ra, rb_row):
  """[n, m] same-segment mask of runs ra [n, 1] and rb_row [1, m]."""
  return ra == rb_row


def out_channel(ck, q_ref, k_ref, v_ref, o_ref, h, gv, scale, dt):
  """o of one per-channel chunk, written into o_ref one sub-chunk of rows at a time."""
  C = ck.C
  s = min(SUB, C)
  gc_ref = ck.g[0]
  k_all = k_ref[ck.rows()]
  v_all = v_ref[ck.rows()]
  hb = h.astype(dt)
  jj = _iota((C, 1), 0)
  for a in range(C // s):
    lo = a * s
    qa = q_ref[ck.rows(lo, s)].astype(f32)
    ga = gc_ref[ck.rows(lo, s)]
    ra = None if ck.seg is None else ck.seg[0][ck.rows(lo, s)]
    qi = qa * jnp.exp(ga)
    if ra is not None:
      qi = jnp.where(ra == 0.0, qi, 0.0)
    o = _dot(qi.astype(dt), hb)
    (D,) = _diag(ck, q_ref, k_ref, lo, s, qa, ga, ra)
    o = o + _dot(D.astype(dt), v_ref[ck.rows(lo, s)])
    if a > 0:  # keys before the sub-chunk, anchored at p = lo - 1
      gp = gc_ref[ck.rows(lo - 1, 1)]
      qd = (qa * jnp.exp(ga - gp)).astype(dt)
      e_k = jnp.exp(jnp.where(jj < lo, gp - gv["gc"], NEG_INF))
      kd = (k_all.astype(f32) * e_k).astype(dt)                        # 0 from row lo on
      A = _dot_nt(qd, kd)                                               # [s, C]
      if ra is not None:
        A = jnp.where(_same_block(ra, gv["rrow"]), A, 0.0)
      o = o + _dot(A.astype(dt), v_all)
    o_ref[ck.rows(lo, s)] = (o * scale).astype(o_ref.dtype)


def grads_scalar(ck, r, gv, scale, dt, NV, BV, has_w):
  """dq, dk, dv (and dw = -dv h^T for the delta rule) of one chunk, scalar / no gate,
  written into the refs; returns nothing. The gate's per-token local derivative
  q.dq - k.dk (+ h_{c+1} . dh_{c+1} at the last token) goes to r['dg'] (scalar gate)."""
  kind, C = ck.kind, ck.C
  rows = ck.rows()
  q, k = r["q"][rows], r["k"][rows]
  dmat = scalar_decay(kind, gv, C)
  a = (_dot_nt(q, k) * dmat * scale).astype(dt)
  kd = to_end(k.astype(f32), kind, gv).astype(dt)
  dp = dq_i = dk_s = dw = 0.0
  hdh = jnp.zeros((1, 1), f32)
  for iv in range(NV):
    cols = pl.ds(iv * BV, BV)
    v, do = r["v"][rows, cols], r["do"][rows, cols]
    h, dh = r["hs"][ck.j, :, cols], r["dhs"][ck.j, :, cols]
    hb, dhb = h.astype(dt), dh.astype(dt)
    dp = dp + _dot_nt(do, v)
    dq_i = dq_i + _dot_nt(do, hb)
    dk_s = dk_s + _dot_nt(v, dhb)
    dv = _dot_tn(a, do) + _dot(kd, dhb)
    r["dv"][rows, cols] = dv.astype(r["dv"].dtype)
    if has_w:
      dw = dw - _dot_nt(dv.astype(dt), hb)
    if kind == "scalar":
      hdh = hdh + jnp.sum(jnp.sum(h * dh, axis=1, keepdims=True), axis=0, keepdims=True)
  dp = (dp * dmat * scale).astype(dt)
  dq = _dot(dp, k) + from_start(dq_i, kind, gv) * scale
  dk_state = to_end(dk_s, kind, gv)
  dk = _dot_tn(dp, q) + dk_state
  r["dq"][rows] = dq.astype(r["dq"].dtype)
  r["dk"][rows] = dk.astype(r["dk"].dtype)
  if has_w:
    r["dw"][rows] = dw.astype(r["dw"].dtype)
  if kind == "scalar":
    t = jnp.sum(q.astype(f32) * dq - k.astype(f32) * dk, axis=1, keepdims=True)   # [C, 1]
    last = (_mask(jnp.exp(gv["blast"]) * hdh, gv, "through")
            + jnp.sum(jnp.sum(k.astype(f32) * dk_state, axis=1, keepdims=True), axis=0,
                      keepdims=True))
    r["dg"][rows] = t + jnp.where(_iota((C, 1), 0) == C - 1, last, 0.0)


def grads_channel(ck, r, gv, scale, dt, backend):
  """dq, dk, dv and dg of one per-channel chunk (whole V), one sub-chunk of rows at a time
  written into the refs. dg is complete: the chunk-local reverse cumsum of q.dq - k.dk plus
  h_{c+1} . dh_{c+1} on every row."""
  C = ck.C
  s = min(SUB, C)
  m = C // s
  gc_ref = ck.g[0]
  rows = ck.rows()
  q_all, k_all, v_all, do_all = r["q"][rows], r["k"][rows], r["v"][rows], r["do"][rows]
  h, dh = r["hs"][ck.j], r["dhs"][ck.j]
  hb, dhb = h.astype(dt), dh.astype(dt)
  gc, gl = gv["gc"], gv["glast"]
  ii = _iota((C, 1), 0)
  ss_causal = _iota((s, s), 0) >= _iota((s, s), 1)
  ts, sums = [], []
  kdks = jnp.zeros_like(gl)
  for a in range(m):
    lo = a * s
    ra_rows = ck.rows(lo, s)
    qa, ka = r["q"][ra_rows], r["k"][ra_rows]
    va, doa = r["v"][ra_rows], r["do"][ra_rows]
    qaf, kaf = qa.astype(f32), ka.astype(f32)
    ga = gc_ref[ra_rows]
    ra = None if ck.seg is None else ck.seg[0][ra_rows]
    carry = None if ra is None else ra == 0.0
    lastm = None if ra is None else ra == ck.seg[0][ck.rows(C - 1, 1)]
    # inter-chunk parts
    dq = _dot_nt(doa, hb) * jnp.exp(ga) * scale
    if carry is not None:
      dq = jnp.where(carry, dq, 0.0)
    e_end = jnp.exp(gl - ga)
    dks = _dot_nt(va, dhb) * e_end
    kd = kaf * e_end
    if lastm is not None:
      dks = jnp.where(lastm, dks, 0.0)
      kd = jnp.where(lastm, kd, 0.0)
    dv = _dot(kd.astype(dt), dhb)
    # diagonal block
    dA = _dot_nt(doa, va) * scale
    okd = ss_causal if ra is None else ss_causal & _same_block(ra, col_to_row(ra))
    dA = jnp.where(okd, dA, 0.0)
    D, dq_d, dk_d = _diag(ck, r["q"], r["k"], lo, s, qaf, ga, ra, dA)
    dv = dv + _dot_tn((D * scale).astype(dt), doa)
    dq = dq + dq_d
    dk = dks + dk_d
    if a > 0:  # queries of the sub-chunk against earlier keys (anchor p = lo - 1)
      gp = gc_ref[ck.rows(lo - 1, 1)]
      e_q = jnp.exp(ga - gp)
      e_k = jnp.exp(jnp.where(ii < lo, gp - gc, NEG_INF))
      kdd = (k_all.astype(f32) * e_k).astype(dt)
      dA_row = _dot_nt(doa, v_all) * scale
      if ra is not None:
        dA_row = jnp.where(_same_block(ra, gv["rrow"]), dA_row, 0.0)
      dq = dq + _dot(dA_row.astype(dt), kdd) * e_q
    if a < m - 1:  # keys of the sub-chunk against later queries (anchor n = lo + s - 1)
      gn = gc_ref[ck.rows(lo + s - 1, 1)]
      e_k2 = jnp.exp(gn - ga)
      kd2 = (kaf * e_k2).astype(dt)
      e_q2 = jnp.exp(jnp.where(ii >= lo + s, gc - gn, NEG_INF))
      qd2 = (q_all.astype(f32) * e_q2).astype(dt)
      A_col = _dot_nt(qd2, kd2) * scale                                 # [C, s]
      dA_col = _dot_nt(do_all, va) * scale
      if ra is not None:
        same_c = _same_block(gv["rcol"], col_to_row(ra))
        A_col = jnp.where(same_c, A_col, 0.0)
        dA_col = jnp.where(same_c, dA_col, 0.0)
      dv = dv + _dot_tn(A_col.astype(dt), do_all)
      dk = dk + _dot_tn(dA_col.astype(dt), qd2) * e_k2
    r["dq"][ra_rows] = dq.astype(r["dq"].dtype)
    r["dk"][ra_rows] = dk.astype(r["dk"].dtype)
    r["dv"][ra_rows] = dv.astype(r["dv"].dtype)
    t = qaf * dq - kaf * dk
    ts.append(t)
    sums.append(jnp.sum(t, axis=0, keepdims=True))
    kdks = kdks + jnp.sum(kaf * dks, axis=0, keepdims=True)
  hdh = col_to_row(jnp.sum(h * dh, axis=1, keepdims=True))            # [1, K]
  last = _mask(jnp.exp(gl) * hdh, gv, "through") + kdks
  suffix = last
  for a in reversed(range(m)):
    r["dg"][ck.rows(a * s, s)] = rev_cumsum_rows(ts[a], backend) + suffix
    suffix = suffix + sums[a]


# --------------------------------------------------------------------------- kernels

def _loop(n, body, carry=None, reverse=False):
  """Run body(j, carry) over the n chunks of a block (static when n == 1)."""
  if n == 1:
    return body(0, carry)
  if reverse:
    return lax.fori_loop(0, n, lambda it, c: body(n - 1 - it, c), carry)
  return lax.fori_loop(0, n, body, carry)


def _base(j, C):
  return j * C if isinstance(j, int) else pl.multiple_of(j * C, C)


def _seq_kernel(*refs, names, mode, kind, C, G, S, scale, has_w, has_seg, varlen, backend,
                reverse, hp):
  """Sequential pass over the chunks of one (batch, head, K tile, V tile). Grid axis 4 walks
  the S blocks of G chunks (GPU: S = 1, G = NT). mode: "state" (write the state entering /
  leaving each chunk to r['hs']) or "fused" (write o). Inputs by name: x (k forward, q
  reverse), y (v / u / do), q (fused), k + w (delta), gate / segment refs, h0, cstart / cend."""
  r = dict(zip(names, refs))
  s_id = pl.program_id(4)
  cb = (S - 1 - s_id) if reverse else s_id
  tpu = backend == "tpu"
  dt = r["x"].dtype
  gates = tuple(r[n] for n in ("g0", "g1") if n in r)
  seg = (r["r0"], r["r1"]) if has_seg else None

  def start():
    if varlen:
      return jnp.zeros(r["hT"].shape[1:], f32)
    return r["h0"][...].astype(f32)

  if tpu:
    @pl.when(s_id == 0)
    def _():
      r["scr"][...] = start()
    h = r["scr"][...]
  else:
    h = start()

  def body(j, h):
    c = cb * G + j
    ck = Ck(kind, C, _base(j, C), j, gates, seg)
    rows = ck.rows()
    gv = gview(ck)
    if varlen:  # a chunk starting sequence n loads its state (reverse: ending it, dS_T)
      n_in = (r["cend"] if reverse else r["cstart"])[c]
      h = jnp.where(n_in >= 0, r["h0"][jnp.maximum(n_in, 0)].astype(f32), h)
    if mode == "state":
      r["hs"][j] = h.astype(r["hs"].dtype)
    if not reverse:
      y = r["y"][rows]
      if has_w:  # delta rule: v_new = u - w h
        y = y.astype(f32) - sdot(r["w"][rows], h, ((1,), (0,)), hp, backend, dt)
        if "vnew" in r:
          r["vnew"][rows] = y.astype(r["vnew"].dtype)
      if mode == "fused":
        if kind == "channel":
          out_channel(ck, r["q"], r["x"], r["y"], r["o"], h, gv, scale, dt)
        else:
          r["o"][rows] = out_scalar(r["q"][rows], r["x"][rows], y, h, kind, gv, C, scale,
                                    dt).astype(r["o"].dtype)
      h = state_update(h, r["x"][rows], y, kind, gv, False, scale, dt, hp, backend)
    elif has_w:  # delta rule reverse: dh <- decay dh + scale (q e^b)^T do - w^T dv_new
      q, k, do = r["x"][rows], r["k"][rows], r["y"][rows]
      a = _dot_nt(q, k) * scalar_decay(kind, gv, C)
      kd = to_end(k.astype(f32), kind, gv)
      dvn = _dot_tn(a.astype(dt), do) * scale + sdot(kd, h, ((1,), (0,)), hp, backend, dt)
      h = (state_update(h, q, do, kind, gv, True, scale, dt, hp, backend)
           - sdot(r["w"][rows], dvn, ((0,), (0,)), hp, backend, dt))
    else:
      h = state_update(h, r["x"][rows], r["y"][rows], kind, gv, True, scale, dt)
    if varlen:
      n_out = (r["cstart"] if reverse else r["cend"])[c]

      @pl.when(n_out >= 0)
      def _():
        r["hT"][n_out] = h
    return h

  h = _loop(G, body, h, reverse=reverse)
  if tpu:
    r["scr"][...] = h
  if not varlen:
    if tpu:
      @pl.when(s_id == S - 1)
      def _():
        r["hT"][...] = h
    else:
      r["hT"][...] = h


def _par_kernel(*refs, names, mode, kind, C, G, scale, has_w, has_seg, backend, NV, BV):
  """Parallel pass over the G chunks of one block: mode "output" (o from the stored chunk
  states) or "grads"."""
  r = dict(zip(names, refs))
  dt = r["q"].dtype
  gates = tuple(r[n] for n in ("g0", "g1") if n in r)
  seg = (r["r0"], r["r1"]) if has_seg else None

  def body(j, carry):
    ck = Ck(kind, C, _base(j, C), j, gates, seg)
    gv = gview(ck)
    if mode == "output":
      if kind == "channel":
        out_channel(ck, r["q"], r["k"], r["v"], r["o"], r["hs"][j], gv, scale, dt)
      else:
        rows = ck.rows()
        r["o"][rows] = out_scalar(r["q"][rows], r["k"][rows], r["v"][rows], r["hs"][j],
                                  kind, gv, C, scale, dt).astype(r["o"].dtype)
    elif kind == "channel":
      grads_channel(ck, r, gv, scale, dt, backend)
    else:
      grads_scalar(ck, r, gv, scale, dt, NV, BV, has_w)
    return carry

  _loop(G, body, 0)


# --------------------------------------------------------------------------- BlockSpecs

@dataclasses.dataclass(frozen=True)
class Geo:
  """Shapes of one call: B, H, padded head dims, chunk C, chunks NT, G chunks per block,
  S = NT / G blocks, tiles BK / BV (0 = whole)."""
  B: int
  H: int
  Kp: int
  Vp: int
  C: int
  NT: int
  G: int

  @property
  def S(self):
    return self.NT // self.G


def _seq_specs(geo, BK, BV, reverse, varlen, N=None):
  """Index-map factories for a sequential grid (b, h, ik, iv, s)."""
  NK, NV = geo.Kp // BK, geo.Vp // BV
  S, G, C = geo.S, geo.G, geo.C
  cb = (lambda s: S - 1 - s) if reverse else (lambda s: s)

  def tok(width, which):  # [B, Tp, H*D] arrays tiled by K ("k"), V ("v") or whole K ("K")
    if which == "k":
      return pl.BlockSpec((None, G * C, width), lambda b, h, ik, iv, s: (b, cb(s), h * NK + ik))
    if which == "v":
      return pl.BlockSpec((None, G * C, width), lambda b, h, ik, iv, s: (b, cb(s), h * NV + iv))
    return pl.BlockSpec((None, G * C, width), lambda b, h, ik, iv, s: (b, cb(s), h))

  def gates(kind):
    if kind == "scalar":
      return [pl.BlockSpec((None, None, G * C, 1), lambda b, h, ik, iv, s: (b, h, cb(s), 0)),
              pl.BlockSpec((None, None, G, 1, C), lambda b, h, ik, iv, s: (b, h, cb(s), 0, 0))]
    if kind == "channel":
      return [tok(BK, "k"),
              pl.BlockSpec((None, None, G, BK, 1), lambda b, h, ik, iv, s: (b, h, cb(s), ik, 0))]
    return []

  def segs():
    return [pl.BlockSpec((None, G * C, 1), lambda b, h, ik, iv, s: (b, cb(s), 0)),
            pl.BlockSpec((None, G, 1, C), lambda b, h, ik, iv, s: (b, cb(s), 0, 0))]

  if varlen:
    state = pl.BlockSpec((N, None, BK, BV), lambda b, h, ik, iv, s: (0, h, ik, iv))
  else:
    state = pl.BlockSpec((None, None, BK, BV), lambda b, h, ik, iv, s: (b, h, ik, iv))
  states = pl.BlockSpec((None, None, G, BK, BV), lambda b, h, ik, iv, s: (b, h, cb(s), ik, iv))
  return tok, gates, segs, state, states


def _flag_spec(backend, NT):
  if backend == "tpu":
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec((NT,), lambda *_: (0,))


def seq_pass(mode, *, x, y, gates, h0, kind, geo, scale, backend, interpret, reverse=False,
             q=None, k=None, w=None, seg=(), flags=None, state_dtype=None, write_vnew=False,
             kernel="state", hp=False):
  """A sequential pass (see `_seq_kernel`). Returns [hs or o, hT (dh0 reverse)] (+ v_new).

  flags: None or (cstart, cend) for the aligned varlen layout (then h0 is [N, H, Kp, Vp]).
  hp: full-precision state-path matmuls (`sdot`), used by the delta rule.
  """
  if backend != "tpu":  # GPU: one program loops over the whole row
    geo = dataclasses.replace(geo, G=geo.NT)
  B, H, Kp, Vp, C, NT = geo.B, geo.H, geo.Kp, geo.Vp, geo.C, geo.NT
  Tp = NT * C
  dt = x.dtype
  has_w = w is not None
  varlen = flags is not None
  N = h0.shape[0]
  tl = tiling.seq_tiles(kernel, backend, dt, B, H, Kp, Vp)
  BK, BV = tl.BK, tl.BV
  if mode == "fused" or has_w:  # the step needs the whole key dim of the state
    BK = Kp
  NK, NV = Kp // BK, Vp // BV
  tok, gate_specs, segs, state, states = _seq_specs(geo, BK, BV, reverse, varlen, N)
  names, args, specs = [], [], []

  def add(name, arr, spec):
    names.append(name)
    args.append(arr)
    specs.append(spec)

  add("x", x, tok(BK, "k"))
  add("y", y, tok(BV, "v"))
  if mode == "fused":
    add("q", q, tok(Kp, "K"))
  if has_w and reverse:
    add("k", k, tok(Kp, "K"))
  for nm, a, sp in zip(("g0", "g1"), gates, gate_specs(kind)):
    add(nm, a, sp)
  for nm, a, sp in zip(("r0", "r1"), seg, segs() if seg else []):
    add(nm, a, sp)
  if has_w:
    add("w", w, tok(Kp, "K"))
  if varlen:
    add("cstart", flags[0], _flag_spec(backend, NT))
    add("cend", flags[1], _flag_spec(backend, NT))
  add("h0", h0, state)
  out_names, out_shape, out_specs = [], [], []

  def out(name, shape, spec):
    out_names.append(name)
    out_shape.append(shape)
    out_specs.append(spec)

  if mode == "state":
    out("hs", jax.ShapeDtypeStruct((B, H, NT, Kp, Vp), state_dtype or dt), states)
  else:
    out("o", jax.ShapeDtypeStruct((B, Tp, H * Vp), dt), tok(BV, "v"))
  out("hT", jax.ShapeDtypeStruct(h0.shape, f32), state)
  if write_vnew:
    out("vnew", jax.ShapeDtypeStruct((B, Tp, H * Vp), dt), tok(BV, "v"))
  scratch = []
  if backend == "tpu":
    scratch = [pltpu.VMEM((BK, BV), f32)]
  kern = functools.partial(
      _seq_kernel, names=tuple(names + out_names + (["scr"] if scratch else [])), mode=mode,
      kind=kind, C=C, G=geo.G, S=geo.S, scale=scale, has_w=has_w, has_seg=bool(seg),
      varlen=varlen, backend=backend, reverse=reverse, hp=hp)
  cp = None
  if not interpret:
    cp = (cm.compiler_params("tpu", ("parallel",) * 4 + ("arbitrary",)) if backend == "tpu"
          else cm.compiler_params("gpu", None, num_warps=tl.num_warps,
                                  num_stages=tl.num_stages))
  return pl.pallas_call(
      kern, out_shape=out_shape, grid=(B, H, NK, NV, geo.S), in_specs=specs,
      out_specs=out_specs, scratch_shapes=scratch, compiler_params=cp,
      interpret=cm.interpret_arg(interpret), name=f"linjax_{mode}_pass")(*args)


def _par_specs(geo, BV=None):
  """Index maps for a parallel grid (b, h, s[, iv])."""
  G, C = geo.G, geo.C
  if BV is not None:  # output kernel with a V-tile grid axis
    NV = geo.Vp // BV
    tokK = lambda w: pl.BlockSpec((None, G * C, w), lambda b, h, s, iv: (b, s, h))
    tokV = pl.BlockSpec((None, G * C, BV), lambda b, h, s, iv: (b, s, h * NV + iv))
    states = pl.BlockSpec((None, None, G, geo.Kp, BV), lambda b, h, s, iv: (b, h, s, 0, iv))
    wrap = lambda f: (lambda b, h, s, iv: f(b, h, s))
  else:
    tokK = lambda w: pl.BlockSpec((None, G * C, w), lambda b, h, s: (b, s, h))
    tokV = pl.BlockSpec((None, G * C, geo.Vp), lambda b, h, s: (b, s, h))
    states = pl.BlockSpec((None, None, G, geo.Kp, geo.Vp), lambda b, h, s: (b, h, s, 0, 0))
    wrap = lambda f: f

  def gates(kind):
    if kind == "scalar":
      return [pl.BlockSpec((None, None, G * C, 1), wrap(lambda b, h, s: (b, h, s, 0))),
              pl.BlockSpec((None, None, G, 1, C), wrap(lambda b, h, s: (b, h, s, 0, 0)))]
    if kind == "channel":
      return [pl.BlockSpec((None, G * C, geo.Kp), wrap(lambda b, h, s: (b, s, h))),
              pl.BlockSpec((None, None, G, geo.Kp, 1), wrap(lambda b, h, s: (b, h, s, 0, 0)))]
    return []

  def segs():
    return [pl.BlockSpec((None, G * C, 1), wrap(lambda b, h, s: (b, s, 0))),
            pl.BlockSpec((None, G, 1, C), wrap(lambda b, h, s: (b, s, 0, 0)))]

  col = pl.BlockSpec((None, None, G * C, 1), wrap(lambda b, h, s: (b, h, s, 0)))
  return tokK, tokV, gates, segs, states, col


def output(q, k, v, gates, hs, *, kind, geo, scale, backend, interpret, seg=()):
  """Two-pass forward, second pass: o of every chunk from the stored chunk states."""
  B, H, Vp = geo.B, geo.H, geo.Vp
  tl = tiling.par_tiles("output", backend, q.dtype, geo.Kp, Vp)
  BV = Vp if kind == "channel" else tl.BV
  NV = Vp // BV
  tokK, tokV, gate_specs, segs, states, _ = _par_specs(geo, BV)
  names = ["q", "k", "v"] + ["g0", "g1"][:len(gates)] + (["r0", "r1"] if seg else []) + ["hs"]
  specs = [tokK(geo.Kp), tokK(geo.Kp), tokV, *gate_specs(kind), *(segs() if seg else []),
           states]
  cp = None
  if not interpret:
    cp = (cm.compiler_params("tpu", ("parallel",) * 4) if backend == "tpu"
          else cm.compiler_params("gpu", None, num_warps=tl.num_warps,
                                  num_stages=tl.num_stages))
  kern = functools.partial(_par_kernel, names=tuple(names + ["o"]), mode="output", kind=kind,
                           C=geo.C, G=geo.G, scale=scale, has_w=False, has_seg=bool(seg),
                           backend=backend, NV=1, BV=BV)
  return pl.pallas_call(
      kern, out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype), grid=(B, H, geo.S, NV),
      in_specs=specs, out_specs=tokV, compiler_params=cp,
      interpret=cm.interpret_arg(interpret), name="linjax_chunk_output")(
          q, k, v, *gates, *seg, hs)


def grads(q, k, v, gates, hs, do, dhs, *, kind, geo, scale, backend, interpret, seg=(),
          has_w=False, grad_dtype=None):
  """Backward, every chunk in parallel: dq, dk, dv in the input dtype (dk, dv in grad_dtype
  when given); dg (scalar: the per-token local derivative [B, H, Tp, 1]; channel: the
  complete gate gradient [B, Tp, H*Kp]); with has_w (delta rule, v = v_new) also
  dw = -dv h^T [B, Tp, H*Kp] f32 (dv is then the gradient of v_new)."""
  B, H, Kp, Vp = geo.B, geo.H, geo.Kp, geo.Vp
  tl = tiling.par_tiles("grads", backend, q.dtype, Kp, Vp)
  BV = Vp if kind == "channel" else tl.BV
  tokK, tokV, gate_specs, segs, states, col = _par_specs(geo)
  names = (["q", "k", "v"] + ["g0", "g1"][:len(gates)] + (["r0", "r1"] if seg else [])
           + ["hs", "do", "dhs"])
  specs = [tokK(Kp), tokK(Kp), tokV, *gate_specs(kind), *(segs() if seg else []), states,
           tokV, states]
  out_names = ["dq", "dk", "dv"]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct(k.shape, grad_dtype or k.dtype),
               jax.ShapeDtypeStruct(v.shape, grad_dtype or v.dtype)]
  out_specs = [tokK(Kp), tokK(Kp), tokV]
  if kind == "scalar":
    out_names.append("dg")
    out_shape.append(jax.ShapeDtypeStruct((B, H, geo.NT * geo.C, 1), f32))
    out_specs.append(col)
  elif kind == "channel":
    out_names.append("dg")
    out_shape.append(jax.ShapeDtypeStruct(q.shape, f32))
    out_specs.append(tokK(Kp))
  if has_w:
    out_names.append("dw")
    out_shape.append(jax.ShapeDtypeStruct(q.shape, f32))
    out_specs.append(tokK(Kp))
  cp = None
  if not interpret:
    cp = (cm.compiler_params("tpu", ("parallel",) * 3) if backend == "tpu"
          else cm.compiler_params("gpu", None, num_warps=tl.num_warps,
                                  num_stages=tl.num_stages))
  kern = functools.partial(_par_kernel, names=tuple(names + out_names), mode="grads",
                           kind=kind, C=geo.C, G=geo.G, scale=scale, has_w=has_w,
                           has_seg=bool(seg), backend=backend, NV=Vp // BV, BV=BV)
  outs = pl.pallas_call(
      kern, out_shape=out_shape, grid=(B, H, geo.S), in_specs=specs, out_specs=out_specs,
      compiler_params=cp, interpret=cm.interpret_arg(interpret), name="linjax_chunk_grads")(
          q, k, v, *gates, *seg, hs, do, dhs)
  return dict(zip(out_names, outs))


# --------------------------------------------------------------------------- host side

def gate_arrays(g, kind, C, H):
  """Raw padded gate -> the kernel's gate inputs (chunk-local fp32 cumsums).

  scalar: g [B, Tp, H] -> (bcol [B,H,Tp,1], brow [B,H,NT,1,C])
  channel: g [B, Tp, H*Kp] -> (gc [B,Tp,H*Kp], gcol [B,H,NT,Kp,1])
  """
  if kind == "none":
    return ()
  B, Tp = g.shape[:2]
  NT = Tp // C
  gc = cm.chunk_cumsum(g, C)
  if kind == "scalar":
    bt = jnp.transpose(gc, (0, 2, 1))                       # [B, H, Tp]
    return bt[..., None], bt.reshape(B, H, NT, 1, C)
  Kp = g.shape[-1] // H
  last = gc.reshape(B, NT, C, H, Kp)[:, :, -1]              # [B, NT, H, Kp]
  return gc, jnp.transpose(last, (0, 2, 1, 3))[..., None]


def scalar_gate_grad(dg_col, C):
  """Per-token local derivatives [B, H, Tp, 1] -> dL/dg [B, Tp, H]: reverse cumsum inside
  each chunk (fp32)."""
  B, H, Tp, _ = dg_col.shape
  t = dg_col[..., 0].reshape(B, H, Tp // C, C)
  t = jnp.flip(jnp.cumsum(jnp.flip(t, -1), axis=-1), -1)
  return jnp.transpose(t.reshape(B, H, Tp), (0, 2, 1))


def segment_arrays(segment_ids, Tp, C):
  """Packed rows [B, T] -> the kernels' segment runs: (column [B, Tp, 1], row [B, NT, 1, C])
  f32. Each token's run (a new run wherever the id changes) counted from the run of the
  token before its chunk (chunk 0: the row's first run, which initial_state feeds), so 0
  means "continues the entering state". Padding joins the last run."""
  seg = jnp.asarray(segment_ids)
  B, T = seg.shape
  runs = jnp.concatenate([jnp.zeros((B, 1), jnp.int32),
                          jnp.cumsum(seg[:, 1:] != seg[:, :-1], axis=1, dtype=jnp.int32)], 1)
  runs = jnp.pad(runs, ((0, 0), (0, Tp - T)), mode="edge").reshape(B, Tp // C, C)
  enter = jnp.concatenate([runs[:, :1, 0], runs[:, :-1, -1]], axis=1)      # [B, NT]
  rel = (runs - enter[..., None]).astype(f32)
  return rel.reshape(B, Tp, 1), rel[:, :, None, :]


def empty_fix(cstart, N):
  """[N] bool: sequence n owns no chunk (an empty sequence of the varlen layout)."""
  return ~jnp.any(cstart[None, :] == jnp.arange(N, dtype=jnp.int32)[:, None], axis=1)


@functools.lru_cache(maxsize=None)
def _make_core(kind, geo, scale, backend, interpret, fused):
  kw = dict(kind=kind, geo=geo, scale=scale, backend=backend, interpret=interpret)

  def forward(q, k, v, g, h0, rcol, rrow, cs, ce):
    seg = () if rcol is None else (rcol, rrow)
    flags = None if cs is None else (cs, ce)
    gates = gate_arrays(g, kind, geo.C, geo.H)
    if fused:
      o, hT = seq_pass("fused", x=k, y=v, q=q, gates=gates, h0=h0, seg=seg, flags=flags,
                       kernel="fused", **kw)
    else:
      hs, hT = seq_pass("state", x=k, y=v, gates=gates, h0=h0, seg=seg, flags=flags, **kw)
      o = output(q, k, v, gates, hs, seg=seg, **kw)
    return o, hT

  def fwd(q, k, v, g, h0, rcol, rrow, cs, ce):
    return forward(q, k, v, g, h0, rcol, rrow, cs, ce), (q, k, v, g, h0, rcol, rrow, cs, ce)

  def bwd(res, cts):
    q, k, v, g, h0, rcol, rrow, cs, ce = res
    seg = () if rcol is None else (rcol, rrow)
    flags = None if cs is None else (cs, ce)
    do, dhT = cts
    do = do.astype(v.dtype)
    gates = gate_arrays(g, kind, geo.C, geo.H)
    hs, _ = seq_pass("state", x=k, y=v, gates=gates, h0=h0, seg=seg, flags=flags,
                     state_dtype=f32, **kw)
    dhs, dh0 = seq_pass("state", x=q, y=do, gates=gates, h0=dhT.astype(f32), seg=seg,
                        flags=flags, reverse=True, state_dtype=f32, **kw)
    if flags is not None:  # empty sequences own no chunk: their dh0 was never written
      dh0 = jnp.where(empty_fix(cs, dh0.shape[0])[:, None, None, None], 0.0, dh0)
    d = grads(q, k, v, gates, hs, do, dhs, seg=seg, **kw)
    dg = None
    if kind == "scalar":
      dg = scalar_gate_grad(d["dg"], geo.C)
    elif kind == "channel":
      dg = d["dg"]
    zero = lambda x: None if x is None else jnp.zeros_like(x)
    return (d["dq"], d["dk"], d["dv"], dg, dh0, zero(rcol), zero(rrow), None, None)

  @jax.custom_vjp
  def core(q, k, v, g, h0, rcol, rrow, cs, ce):
    return forward(q, k, v, g, h0, rcol, rrow, cs, ce)

  core.defvjp(fwd, bwd)
  return core


def check_segments(segment_ids, cu_seqlens, B, T):
  if segment_ids is None:
    return
  if cu_seqlens is not None:
    raise ValueError("pass either `cu_seqlens` (B = 1 packing) or `segment_ids`, not both")
  if getattr(segment_ids, "shape", None) != (B, T):
    raise ValueError(f"`segment_ids` must have shape [B, T] = {(B, T)}, got "
                     f"{getattr(segment_ids, 'shape', None)}")


def prepare(q, k, v, extra, *, T, C, backend, cu_seqlens, segment_ids, initial_state):
  """Shared host side of the GLA and delta-rule ops: padding, layouts, varlen, segments.

  extra: (name, array, layout) with layout "tok" ([B, T, H] padded along T) or "tokK"
  ([B, T, H, K] to the kernel layout). Returns a dict with the kernel-layout arrays, geo,
  h0, segment runs, varlen flags, the aligned layout (or None) and `finish(o, S)` mapping
  the kernel outputs back.
  """
  B, _, H, K = q.shape
  V = v.shape[-1]
  Kp, Vp = cm.padded_dim(K, backend), cm.padded_dim(V, backend)
  lay = None
  if cu_seqlens is not None:
    if B != 1:
      raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    lay = cm.aligned_layout(cu_seqlens, T, C)
    q, k, v = (cm.to_aligned(lay, x) for x in (q, k, v))
    extra = [(n, cm.to_aligned(lay, a), l) for n, a, l in extra]
    Tin, NTa = lay["Tp"], lay["NT"]
  else:
    Tin, NTa = T, -(-max(T, 1) // C)
  G = tiling.chunks_per_step(backend, B if lay is None else 1, H, NTa, C, Kp, Vp)
  NT = -(-NTa // G) * G
  Tp = NT * C
  geo = Geo(B=B, H=H, Kp=Kp, Vp=Vp, C=C, NT=NT, G=G)
  out = dict(geo=geo, lay=lay, K=K, V=V)
  out["q"], out["k"] = cm.to_kernel_layout(q, Tp, Kp), cm.to_kernel_layout(k, Tp, Kp)
  out["v"] = cm.to_kernel_layout(v.astype(q.dtype), Tp, Vp)
  for n, a, l in extra:
    if a is None:
      out[n] = None
    elif l == "tok":
      out[n] = cm.pad_axis(a.astype(f32), 1, Tp)
    else:
      out[n] = cm.to_kernel_layout(a.astype(f32), Tp, Kp)
  n_states = B if lay is None else lay["N"]
  if initial_state is None:
    h0 = jnp.zeros((n_states, H, Kp, Vp), f32)
  else:
    h0 = cm.pad_axis(cm.pad_axis(initial_state.astype(f32), 2, Kp), 3, Vp)
  out["h0"] = h0
  out["rcol"] = out["rrow"] = out["cs"] = out["ce"] = None
  if segment_ids is not None:
    out["rcol"], out["rrow"] = segment_arrays(segment_ids, Tp, C)
  if lay is not None:
    pad = NT - lay["NT"]
    out["cs"] = jnp.pad(lay["cstart"], (0, pad), constant_values=-1)
    out["ce"] = jnp.pad(lay["cend"], (0, pad), constant_values=-1)

  def finish(o, S, dtype):
    o = o.reshape(o.shape[0], Tp, H, Vp)[:, :Tin, :, :V].astype(dtype)
    if lay is not None:
      o = cm.from_aligned(lay, o)
      S = jnp.where(lay["empty"][:, None, None, None], h0, S)
    return o, S[:, :, :K, :V]

  out["finish"] = finish
  return out


def gla_chunk_impl(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens,
                   chunk_size, interpret, backend, segment_ids=None, form="auto"):
  """The whole op for one backend ("gpu" or "tpu" style kernels). form: "auto" (the shape
  rule of `tiling.use_fused`), "fused" or "two_pass"."""
  B, T, H, K = q.shape
  scale = float(K ** -0.5 if scale is None else scale)
  C = int(chunk_size)
  if C < 16 or C & (C - 1):
    raise ValueError(f"chunk_size must be a power of two >= 16, got {C}")
  if form not in ("auto", "fused", "two_pass"):
    raise ValueError(f"form must be 'auto', 'fused' or 'two_pass', got {form!r}")
  kind = "none" if g is None else ("scalar" if g.ndim == 3 else "channel")
  check_segments(segment_ids, cu_seqlens, B, T)
  p = prepare(q, k, v, [("g", g, "tok" if kind == "scalar" else "tokK")], T=T, C=C,
              backend=backend, cu_seqlens=cu_seqlens, segment_ids=segment_ids,
              initial_state=initial_state)
  geo = p["geo"]
  fused = (tiling.use_fused(backend, geo.B, H, geo.Vp, geo.NT, q.dtype) if form == "auto"
           else form == "fused")
  core = _make_core(kind, geo, scale, backend, interpret, fused)
  o, S = core(p["q"], p["k"], p["v"], p["g"], p["h0"], p["rcol"], p["rrow"], p["cs"], p["ce"])
  o, S = p["finish"](o, S, v.dtype)
  return o, (S if output_final_state else None)
