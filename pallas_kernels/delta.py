"""Chunkwise (gated) delta rule in WY / UT form, forward and backward, in Pallas.

  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t,   o_t = scale q_t S_t

Per chunk (b = chunk-local fp32 cumsum of g, one per head; g = None means b = 0):
  L_ij = beta_i exp(b_i - b_j) k_i . k_j  (j < i, masked before the exp),  T = (I + L)^-1
  w = T diag(beta exp(b)) k,   u = T diag(beta) v                          ("WY", `wy`)
  v_new = u - w h_c;   h_{c+1} = exp(b_last) h_c + (k exp(b_last - b))^T v_new
  o = scale (q exp(b)) h_c + scale [(q k^T) exp(b_i - b_j)]_{j<=i} v_new
so after the WY kernel the sequential pass is gla's (`gla.seq_pass` with w: it forms
v_new = u - w h in the loop), fused or two-pass by the same shape rule, GPU and TPU.

WY kernel (`wy`, one program per (batch, head, chunk); TPU: G chunks per grid step), in
sub-blocks of 16 so no [C, C] block is ever assembled: L's [16, 16] blocks from k k^T (input
dtype, fp32 accumulation); each diagonal block inverted by forward substitution on its
transpose (16 steps of [16, 16] vector work, fp32); the off-diagonal blocks of T by
  T_ab = -T_aa sum_{b <= c < a} L_ac T_cb                     ([16, 16] matmuls);
w, u rows of each sub-chunk from T's blocks ([16, 16] x [16, D] matmuls), written straight
into the outputs (fp32). These matmuls of fp32 values run at full precision: three bf16
passes on a GPU's tensor cores for bf16 inputs, fp32 HIGHEST on a TPU (`_Mm`). In the
backward the same kernel also writes T's blocks (diagonal blocks transposed), which `wy_bwd`
reads: T is computed once per backward.

Backward (custom_vjp; residuals are the inputs only):
  1. `wy` (w, u and T);
  2. the forward state pass (fp32 chunk states h_c, and v_new);
  3. the reverse state pass from dS_T (gla.seq_pass, reverse with w):
        dv_new = scale A^T do + (k exp(b_last - b)) dh,
        dh    <- exp(b_last) dh + scale (q exp(b))^T do - w^T dv_new
     writing dh per chunk (fp32: the gradient of the state leaving it) and dh0;
  4. gla's `grads` kernel with v_new for v: dq, dk through A and the state, du = dv_new,
     dw = -dv_new h_c^T, and the gate's per-token local derivative (fp32); dv_new is
     recomputed there (scale A^T do + k_dec dh, a parallel matmul) rather than written by
     the reverse pass (an fp32 [T, V] round trip);
  5. `wy_bwd`: dT = dw X^T + du Y^T, dL = -T^T dT T^T (blocks), and from them dk, dv, dbeta
     and the gate's local derivative through w's exp(b) and L's decay;
  6. gate: the per-token local derivatives of 4 and 5 reverse-cumsummed inside each chunk
     (fp32). As in gla.py, the cross-chunk part of dg is h_{c+1} . dh_{c+1} at each chunk's
     last token; nothing is summed over the whole sequence.

Packed rows (segment_ids): L is masked to same-segment pairs (T is block diagonal by
segment), only tokens of the run the entering state belongs to get exp(b) in w (the others
do not see h_c), and the state pass applies gla's masks. Varlen (cu_seqlens) uses gla's
aligned layout: every chunk belongs to one sequence.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm
from pallas_kernels import gla as _gla
from pallas_kernels import tiling

f32 = jnp.float32
NEG_INF = float("-inf")
S16 = 16  # sub-block of the UT inverse

_dot, _dot_tn, _dot_nt, _iota = _gla._dot, _gla._dot_tn, _gla._dot_nt, _gla._iota


class _Mm:
  """The WY kernels' fp32 matmuls (T's blocks, w, u and their gradients): full precision,
  on the GPU as three bf16 passes on the tensor cores for bf16 / fp16 inputs (gla.sdot)."""

  def __init__(self, backend, dt):
    self.backend, self.dt = backend, dt

  def dot(self, a, b):
    return _gla.sdot(a, b, ((1,), (0,)), True, self.backend, self.dt)

  def dot_tn(self, a, b):
    return _gla.sdot(a, b, ((0,), (0,)), True, self.backend, self.dt)

  def dot_nt(self, a, b):
    return _gla.sdot(a, b, ((1,), (1,)), True, self.backend, self.dt)


def _row_to_col(x):
  """[1, n] -> [n, 1] by a masked reduction."""
  n = x.shape[-1]
  return jnp.sum(jnp.where(_iota((n, n), 0) == _iota((n, n), 1), x, 0.0), axis=1,
                 keepdims=True)


def _inv_diag(L):
  """Transpose of (I + L)^-1 for strictly lower L [16, 16] f32, by forward substitution:
  column r of the result is e_r - sum_{j < r} L_rj (column j)."""
  n = L.shape[0]
  rows, cols = _iota((n, 1), 0), _iota((n, n), 1)
  rows_nn = _iota((n, n), 0)

  def body(r, Tt):
    l_r = jnp.sum(jnp.where(rows_nn == r, L, 0.0), axis=0, keepdims=True)     # [1, n]
    col = jnp.where(rows == r, 1.0, 0.0) - jnp.sum(Tt * l_r, axis=1, keepdims=True)
    return jnp.where(cols == r, col, Tt)

  return lax.fori_loop(0, n, body, jnp.zeros((n, n), f32))


class _Blocks:
  """Per-chunk sub-block quantities of the WY form (sub-chunks of 16 rows)."""

  def __init__(self, r, ck, gated, has_seg):
    C = ck.C
    self.m = m = C // S16
    self.k, self.beta, self.b, self.brow, self.carry, self.run, self.runrow = ([] for _ in range(7))
    for a in range(m):
      rows = ck.rows(a * S16, S16)
      self.k.append(r["k"][rows])
      self.beta.append(r["beta"][rows])
      if gated:
        self.b.append(r["g0"][rows])
        self.brow.append(r["brow16"][ck.j * m + a])
      if has_seg:
        self.run.append(r["r0"][rows])
        self.runrow.append(r["rrow16"][ck.j * m + a])
    self.gated, self.has_seg = gated, has_seg

  def eb(self, a):
    """exp(b) of sub-chunk a's rows, zero on rows that do not see the entering state."""
    e = jnp.exp(self.b[a]) if self.gated else jnp.ones_like(self.beta[a])
    if self.has_seg:
      e = jnp.where(self.run[a] == 0.0, e, 0.0)
    return e

  def mask(self, a, b):
    """[16, 16] bool: entries of L's block (a, b) that exist (i > j, same segment)."""
    m = (_iota((S16, S16), 0) > _iota((S16, S16), 1)) if a == b else jnp.ones((S16, S16), bool)
    if self.has_seg:
      m = m & (self.run[a] == self.runrow[b])
    return m

  def gamma(self, a, b):
    """exp(b_i - b_j) on the block's mask (0 elsewhere, masked before the exp)."""
    ok = self.mask(a, b)
    if not self.gated:
      return jnp.where(ok, 1.0, 0.0).astype(f32)
    return jnp.exp(jnp.where(ok, self.b[a] - self.brow[b], NEG_INF))


def _tmul(mm, T, a, b, x, transpose=False):
  """T_ab x (or T_ab^T x) with T's blocks as stored: T[(a, a)] is T_aa transposed."""
  blk = T[(a, b)]
  if a == b:
    return mm.dot(blk, x) if transpose else mm.dot_tn(blk, x)
  return mm.dot_tn(blk, x) if transpose else mm.dot(blk, x)


def _wy_chunk(ck, r, gated, has_seg, want_A, mm):
  bl = _Blocks(r, ck, gated, has_seg)
  m = bl.m
  kk = {}
  T = {}
  X, Y = [], []
  for a in range(m):
    for b in range(a + 1):
      kk[(a, b)] = _dot_nt(bl.k[a], bl.k[b]) * bl.gamma(a, b)        # k_i . k_j Gamma_ij
    L_aa = bl.beta[a] * kk[(a, a)]
    T[(a, a)] = _inv_diag(L_aa)
    for b in range(a - 1, -1, -1):
      acc = mm.dot_nt(bl.beta[a] * kk[(a, b)], T[(b, b)])            # L_ab T_bb
      for c in range(b + 1, a):
        acc = acc + mm.dot(bl.beta[a] * kk[(a, c)], T[(c, b)])
      T[(a, b)] = -mm.dot_tn(T[(a, a)], acc)
    X.append(bl.beta[a] * bl.eb(a) * bl.k[a].astype(f32))
    Y.append(bl.beta[a] * r["v"][ck.rows(a * S16, S16)].astype(f32))
  for a in range(m):
    w = sum(_tmul(mm, T, a, b, X[b]) for b in range(a + 1))
    u = sum(_tmul(mm, T, a, b, Y[b]) for b in range(a + 1))
    rows = ck.rows(a * S16, S16)
    r["w"][rows] = w.astype(r["w"].dtype)
    r["u"][rows] = u.astype(r["u"].dtype)
    if want_A:
      for b in range(a + 1):
        r["A"][ck.j, a * m + b] = T[(a, b)]


def _wy_bwd_chunk(ck, r, gated, has_seg, mm):
  bl = _Blocks(r, ck, gated, has_seg)
  m = bl.m
  T = {(a, b): r["A"][ck.j, a * m + b] for a in range(m) for b in range(a + 1)}
  rows = [ck.rows(a * S16, S16) for a in range(m)]
  kf = [x.astype(f32) for x in bl.k]
  v = [r["v"][rw].astype(f32) for rw in rows]
  dw = [r["dw"][rw] for rw in rows]
  du = [r["du"][rw] for rw in rows]
  eb = [bl.eb(a) for a in range(m)]
  X = [bl.beta[a] * eb[a] * kf[a] for a in range(m)]
  Y = [bl.beta[a] * v[a] for a in range(m)]
  dX = [sum(_tmul(mm, T, a, b, dw[a], True) for a in range(b, m)) for b in range(m)]
  dY = [sum(_tmul(mm, T, a, b, du[a], True) for a in range(b, m)) for b in range(m)]
  dT = {(a, b): mm.dot_nt(dw[a], X[b]) + mm.dot_nt(du[a], Y[b])
        for a in range(m) for b in range(a + 1)}
  P = {}
  for a in range(m):
    for d in range(a + 1):
      P[(a, d)] = sum(_tmul(mm, T, c, a, dT[(c, d)], True) for c in range(a, m))
  dk = [r["dk_in"][rw] + bl.beta[a] * eb[a] * dX[a] for a, rw in enumerate(rows)]
  dbeta = [jnp.sum(dX[a] * eb[a] * kf[a], axis=1, keepdims=True)
           + jnp.sum(dY[a] * v[a], axis=1, keepdims=True) for a in range(m)]
  db = [jnp.sum(dX[a] * X[a], axis=1, keepdims=True) for a in range(m)]
  for a in range(m):
    for b in range(a + 1):
      # dL_ab = -sum_{d <= b} P_ad T_bd^T
      dL = -(mm.dot(P[(a, b)], T[(b, b)]) + sum(
          (mm.dot_nt(P[(a, d)], T[(b, d)]) for d in range(b)), jnp.zeros((S16, S16), f32)))
      gam = bl.gamma(a, b)
      kkg = _dot_nt(bl.k[a], bl.k[b]) * gam
      dbeta[a] = dbeta[a] + jnp.sum(dL * kkg, axis=1, keepdims=True)
      dkk = dL * bl.beta[a] * gam
      dk[a] = dk[a] + mm.dot(dkk, kf[b])
      dk[b] = dk[b] + mm.dot_tn(dkk, kf[a])
      if gated:
        E = dL * bl.beta[a] * kkg
        db[a] = db[a] + jnp.sum(E, axis=1, keepdims=True)
        db[b] = db[b] - _row_to_col(jnp.sum(E, axis=0, keepdims=True))
  for a, rw in enumerate(rows):
    r["dk"][rw] = dk[a].astype(r["dk"].dtype)
    r["dv"][rw] = (bl.beta[a] * dY[a]).astype(r["dv"].dtype)
    r["dbeta"][rw] = dbeta[a]
    if gated:
      r["db"][rw] = db[a]


def _wy_kernel(*refs, names, mode, C, G, gated, has_seg, want_A, backend):
  r = dict(zip(names, refs))
  mm = _Mm(backend, r["k"].dtype)

  def body(j, carry):
    ck = _gla.Ck("none", C, _gla._base(j, C), j)
    if mode == "fwd":
      _wy_chunk(ck, r, gated, has_seg, want_A, mm)
    else:
      _wy_bwd_chunk(ck, r, gated, has_seg, mm)
    return carry

  _gla._loop(G, body, 0)


def _wy_specs(geo):
  G, C, m = geo.G, geo.C, geo.C // S16
  tokK = pl.BlockSpec((None, G * C, geo.Kp), lambda b, h, s: (b, s, h))
  tokV = pl.BlockSpec((None, G * C, geo.Vp), lambda b, h, s: (b, s, h))
  col = pl.BlockSpec((None, None, G * C, 1), lambda b, h, s: (b, h, s, 0))
  row16 = pl.BlockSpec((None, None, G * m, 1, S16), lambda b, h, s: (b, h, s, 0, 0))
  segcol = pl.BlockSpec((None, G * C, 1), lambda b, h, s: (b, s, 0))
  segrow16 = pl.BlockSpec((None, G * m, 1, S16), lambda b, h, s: (b, s, 0, 0))
  A = pl.BlockSpec((None, None, G, m * m, S16, S16), lambda b, h, s: (b, h, s, 0, 0, 0))
  return tokK, tokV, col, row16, segcol, segrow16, A


def _wy_inputs(geo, k, v, beta_col, bcol, rcol):
  """Arrays and specs shared by the WY kernels (beta and b as columns, b and the segment
  runs also as rows of 16)."""
  tokK, tokV, col, row16, segcol, segrow16, _ = _wy_specs(geo)
  B, H, Tp = geo.B, geo.H, geo.NT * geo.C
  names, args, specs = ["k", "v", "beta"], [k, v, beta_col], [tokK, tokV, col]
  if bcol is not None:
    names += ["g0", "brow16"]
    args += [bcol, bcol.reshape(B, H, Tp // S16, 1, S16)]
    specs += [col, row16]
  if rcol is not None:
    names += ["r0", "rrow16"]
    args += [rcol, rcol.reshape(B, Tp // S16, 1, S16)]
    specs += [segcol, segrow16]
  return names, args, specs


def _cp(backend, interpret, dtype, Kp, Vp):
  if interpret:
    return None
  if backend == "tpu":
    return cm.compiler_params("tpu", ("parallel",) * 3)
  tl = tiling.par_tiles("wy", backend, dtype, Kp, Vp)
  return cm.compiler_params("gpu", None, num_warps=tl.num_warps, num_stages=tl.num_stages)


def wy(k, v, beta_col, bcol, rcol, *, geo, backend, interpret, want_A, scale=None):
  """w [B,Tp,H*Kp], u [B,Tp,H*Vp] (both fp32) and, with want_A, T's blocks
  [B,H,NT,m*m,16,16] f32 (diagonal blocks transposed; the upper blocks are never written)."""
  names, args, specs = _wy_inputs(geo, k, v, beta_col, bcol, rcol)
  tokK, tokV, _, _, _, _, Aspec = _wy_specs(geo)
  B, H, NT, m = geo.B, geo.H, geo.NT, geo.C // S16
  out_names = ["w", "u"] + (["A"] if want_A else [])
  out_shape = [jax.ShapeDtypeStruct(k.shape, f32), jax.ShapeDtypeStruct(v.shape, f32)]
  out_specs = [tokK, tokV]
  if want_A:
    out_shape.append(jax.ShapeDtypeStruct((B, H, NT, m * m, S16, S16), f32))
    out_specs.append(Aspec)
  kern = functools.partial(_wy_kernel, names=tuple(names + out_names), mode="fwd", C=geo.C,
                           G=geo.G, gated=bcol is not None, has_seg=rcol is not None,
                           want_A=want_A, backend=backend)
  return pl.pallas_call(
      kern, out_shape=out_shape, grid=(B, H, geo.S), in_specs=specs, out_specs=out_specs,
      compiler_params=_cp(backend, interpret, k.dtype, geo.Kp, geo.Vp),
      interpret=cm.interpret_arg(interpret), name="linjax_delta_wy")(*args)


def wy_bwd(k, v, beta_col, bcol, rcol, A, dw, du, dk_in, *, geo, backend, interpret, scale=None):
  """Back through the WY form: (dk = dk_in + the WY part, dv, dbeta [B,H,Tp,1], db
  [B,H,Tp,1] (the gate's per-token local derivative; None ungated))."""
  names, args, specs = _wy_inputs(geo, k, v, beta_col, bcol, rcol)
  tokK, tokV, col, _, _, _, Aspec = _wy_specs(geo)
  names += ["A", "dw", "du", "dk_in"]
  args += [A, dw, du, dk_in]
  specs += [Aspec, tokK, tokV, tokK]
  out_names = ["dk", "dv", "dbeta"]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
               jax.ShapeDtypeStruct(beta_col.shape, f32)]
  out_specs = [tokK, tokV, col]
  gated = bcol is not None
  if gated:
    out_names.append("db")
    out_shape.append(jax.ShapeDtypeStruct(beta_col.shape, f32))
    out_specs.append(col)
  kern = functools.partial(_wy_kernel, names=tuple(names + out_names), mode="bwd", C=geo.C,
                           G=geo.G, gated=gated, has_seg=rcol is not None, want_A=False,
                           backend=backend)
  outs = pl.pallas_call(
      kern, out_shape=out_shape, grid=(geo.B, geo.H, geo.S), in_specs=specs,
      out_specs=out_specs, compiler_params=_cp(backend, interpret, k.dtype, geo.Kp, geo.Vp),
      interpret=cm.interpret_arg(interpret), name="linjax_delta_wy_bwd")(*args)
  return tuple(outs) + ((None,) if not gated else ())


# ----------------------------------------------------------------------------- the op

@functools.lru_cache(maxsize=None)
def _make_core(gated, geo, scale, backend, interpret, fused):
  kw = dict(geo=geo, scale=scale, backend=backend, interpret=interpret)
  kind = "scalar" if gated else "none"

  def prep(k, v, beta, g, rcol, want_A):
    beta_col = jnp.transpose(beta, (0, 2, 1))[..., None]               # [B, H, Tp, 1]
    gates = _gla.gate_arrays(g, kind, geo.C, geo.H) if gated else ()
    bcol = gates[0] if gated else None
    outs = wy(k, v, beta_col, bcol, rcol, want_A=want_A, **kw)
    return beta_col, gates, bcol, outs

  def forward(q, k, v, beta, g, h0, rcol, rrow, cs, ce):
    seg = () if rcol is None else (rcol, rrow)
    flags = None if cs is None else (cs, ce)
    _, gates, _, (w, u) = prep(k, v, beta, g, rcol, False)
    sk = dict(gates=gates, h0=h0, seg=seg, flags=flags, kind=kind, kernel="delta_state",
              hp=True, **kw)
    if fused:
      return tuple(_gla.seq_pass("fused", x=k, y=u, q=q, w=w, **sk))
    hs, hT, vnew = _gla.seq_pass("state", x=k, y=u, w=w, write_vnew=True, **sk)
    o = _gla.output(q, k, vnew, gates, hs, kind=kind, seg=seg, **kw)
    return o, hT

  def fwd(*args):
    return forward(*args), args

  def bwd(res, cts):
    q, k, v, beta, g, h0, rcol, rrow, cs, ce = res
    seg = () if rcol is None else (rcol, rrow)
    flags = None if cs is None else (cs, ce)
    do, dhT = cts
    do = do.astype(q.dtype)
    beta_col, gates, bcol, (w, u, A) = prep(k, v, beta, g, rcol, True)
    sk = dict(gates=gates, seg=seg, flags=flags, kind=kind, kernel="delta_state",
              state_dtype=f32, hp=True, **kw)
    hs, _, vnew = _gla.seq_pass("state", x=k, y=u, w=w, h0=h0, write_vnew=True, **sk)
    dhs, dh0 = _gla.seq_pass("state", x=q, y=do, k=k, w=w, h0=dhT.astype(f32), reverse=True,
                             **sk)
    if flags is not None:
      dh0 = jnp.where(_gla.empty_fix(cs, dh0.shape[0])[:, None, None, None], 0.0, dh0)
    d = _gla.grads(q, k, vnew, gates, hs, do, dhs, kind=kind, seg=seg, has_w=True,
                   grad_dtype=f32, **kw)
    dk, dv, dbeta_col, db = wy_bwd(k, v, beta_col, bcol, rcol, A, d["dw"], d["dv"], d["dk"],
                                   **kw)
    dbeta = jnp.transpose(dbeta_col[..., 0], (0, 2, 1))
    dg = _gla.scalar_gate_grad(d["dg"] + db, geo.C) if gated else None
    zero = lambda x: None if x is None else jnp.zeros_like(x)
    return (d["dq"].astype(q.dtype), dk, dv, dbeta, dg, dh0, zero(rcol), zero(rrow), None,
            None)

  @jax.custom_vjp
  def core(q, k, v, beta, g, h0, rcol, rrow, cs, ce):
    return forward(q, k, v, beta, g, h0, rcol, rrow, cs, ce)

  core.defvjp(fwd, bwd)
  return core


def delta_rule_chunk_impl(q, k, v, beta, g, *, scale, initial_state, output_final_state,
                          cu_seqlens, chunk_size, interpret, backend, segment_ids=None,
                          form="auto"):
  B, T, H, K = q.shape
  scale = float(K ** -0.5 if scale is None else scale)
  C = int(chunk_size)
  if C < 16 or C & (C - 1):
    raise ValueError(f"chunk_size must be a power of two >= 16, got {C}")
  if form not in ("auto", "fused", "two_pass"):
    raise ValueError(f"form must be 'auto', 'fused' or 'two_pass', got {form!r}")
  if g is not None and g.ndim != 3:
    raise ValueError(f"delta rule gate g must be [B, T, H] (one decay per head), got {g.shape}")
  _gla.check_segments(segment_ids, cu_seqlens, B, T)
  p = _gla.prepare(q, k, v, [("beta", beta, "tok"), ("g", g, "tok")], T=T, C=C,
                   backend=backend, cu_seqlens=cu_seqlens, segment_ids=segment_ids,
                   initial_state=initial_state)
  geo = p["geo"]
  fused = (tiling.use_fused(backend, geo.B, H, geo.Vp, geo.NT, q.dtype) if form == "auto"
           else form == "fused")
  core = _make_core(g is not None, geo, scale, backend, interpret, fused)
  o, S = core(p["q"], p["k"], p["v"], p["beta"], p["g"], p["h0"], p["rcol"], p["rrow"],
              p["cs"], p["ce"])
  o, S = p["finish"](o, S, v.dtype)
  return o, (S if output_final_state else None)
