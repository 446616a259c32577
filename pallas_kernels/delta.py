"""Chunkwise (gated) delta rule in WY / UT form, forward and backward.

  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t,   o_t = scale q_t S_t

Per chunk (b = chunk-local cumsum of g, scalar per head; g = None means b = 0):
  L_ji = beta_j exp(b_j - b_i) k_j . k_i  (i < j, masked before the exp),  T = (I + L)^-1
  u = T diag(beta) v,   w = T diag(beta exp(b)) k                 (fp32, "WY prep", jnp)
  v_new = u - w h_c;    h_{c+1} = exp(b_last) h_c + (k exp(b_last - b))^T v_new
  o = scale (q exp(b)) h_c + scale [(q k^T) exp(b_i - b_j)]_{j<=i} v_new
so the sequential pass is gla.state_pass with `w` (it also writes v_new) and the output is
gla.output with v_new in place of v: the same Pallas kernels, GPU and TPU lowerings.

Backward (custom_vjp; Pallas kernels for everything that scales with T x K x V):
  1. recompute w, u (jnp, under jax.vjp) and h_c, v_new (the forward state-pass kernel);
  2. `state_bwd` kernel, sequential over chunks in reverse, from dh = dS_T:
        dv_new = scale A^T do + (k exp(b_last - b)) dh
        dh    <- exp(b_last) dh + scale (q exp(b))^T do - w^T dv_new
     writing dh per chunk (the gradient of the state leaving it), dv_new and dh0;
  3. gla's `grads` kernel with v_new for v gives dq and the k gradient through A and the
     state (v_new and h_c are treated as inputs there);
  4. dw = -dv_new h_c^T, du = dv_new go back through the WY prep's vjp (dk, dv, dbeta and
     the gate's intra-chunk part);
  5. gate: dL/dB_t for the global cumsum B is q.dq - k.dk (step 3), plus the final-state term
     S_T . dS_T at the last token, plus, at the last token of chunk c - 1, the read of h_c
     by w: sum over chunk c of w . dw. Reverse-cumsummed, plus step 4's part.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common as cm
from pallas_kernels import gla as _gla

f32 = jnp.float32


def _wy(k, v, beta, g, C, H, rcol=None):
  """k [B,Tp,H*Kp], v [B,Tp,H*Vp], beta [B,Tp,H], g None|[B,Tp,H] raw -> per-chunk f32 parts.
  rcol: packed rows' segment runs relative to each chunk's entering run ([B,Tp,1], see
  gla.segment_arrays): L keeps same-segment pairs, w only the entering run's rows.

  Returns kc [B,NT,H,C,Kp], w, u [B,NT,H,C,*], b [B,NT,H,C] (chunk-local cumsum).
  """
  B, Tp, HK = k.shape
  NT = Tp // C
  kc = k.astype(f32).reshape(B, NT, C, H, -1).transpose(0, 1, 3, 2, 4)
  vc = v.astype(f32).reshape(B, NT, C, H, -1).transpose(0, 1, 3, 2, 4)
  bc = beta.astype(f32).reshape(B, NT, C, H).transpose(0, 1, 3, 2)
  if g is None:
    b = jnp.zeros_like(bc)
  else:
    b = jnp.cumsum(g.astype(f32).reshape(B, NT, C, H).transpose(0, 1, 3, 2), axis=-1)
  strict = jnp.tril(jnp.ones((C, C), bool), -1)
  eb = jnp.exp(b)
  if rcol is not None:
    r = rcol.reshape(B, NT, 1, C)
    strict = strict & (r[..., :, None] == r[..., None, :])
    eb = jnp.where(r == 0.0, eb, 0.0)
  kk = jnp.einsum("bnhia,bnhja->bnhij", kc, kc)
  decay = jnp.exp(jnp.where(strict, b[..., :, None] - b[..., None, :], -jnp.inf))
  Lm = bc[..., :, None] * kk * decay
  T = cm.inv_unit_lower(Lm)
  u = T @ (bc[..., None] * vc)
  w = T @ ((bc * eb)[..., None] * kc)
  return kc, w, u, b


def _to_layout(x):
  """[B, NT, H, C, D] -> [B, Tp, H*D]."""
  B, NT, H, C, D = x.shape
  return x.transpose(0, 1, 3, 2, 4).reshape(B, NT * C, H * D)


def _from_layout(x, C, H):
  """[B, Tp, H*D] -> [B, NT, H, C, D]."""
  B, Tp, HD = x.shape
  return x.reshape(B, Tp // C, C, H, HD // H).transpose(0, 1, 3, 2, 4)


# ------------------------------------------------------------------ backward state kernel

def bwd_step(dh, q, k, w, do, kind, gv, scale, C):
  """One chunk of the reverse pass. Returns (dh for the previous chunk, dv_new [C, V] f32)."""
  dt = q.dtype
  a = _gla._dot_nt(q, k) * _gla._scalar_decay(kind, gv, C)            # [C, C] f32
  kd = _gla._to_end(k.astype(f32), kind, gv)
  dvn = _gla._dot_tn(a.astype(dt), do) * scale + _gla._dot(kd.astype(dt), dh.astype(dt))
  qd = _gla._from_start(q.astype(f32), kind, gv) * scale
  dh = (_gla._decay_state(dh, kind, gv) + _gla._dot_tn(qd.astype(dt), do)
        - _gla._dot_tn(w, dvn.astype(dt)))
  return dh, dvn


def _state_bwd_kernel_gpu(*refs, kind, NT, C, scale, has_seg):
  ne = _gla._n_extra(kind, has_seg)
  q_ref, k_ref, w_ref, do_ref = refs[:4]
  e_refs = refs[4:4 + ne]
  dhT_ref, dhs_ref, dh0_ref, dv_ref = refs[4 + ne:]

  def body(it, dh):
    c = NT - 1 - it
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    gv = _gla._view(kind, _gla._load_chunk(e_refs, c, rows), C, has_seg)
    dhs_ref[c] = dh.astype(dhs_ref.dtype)
    dh, dvn = bwd_step(dh, q_ref[rows, :], k_ref[rows, :], w_ref[rows, :], do_ref[rows, :],
                       kind, gv, scale, C)
    dv_ref[rows, :] = dvn.astype(dv_ref.dtype)
    return dh

  dh0_ref[...] = lax.fori_loop(0, NT, body, dhT_ref[...].astype(f32))


def _state_bwd_kernel_tpu(*refs, kind, NT, C, scale, has_seg):
  ne = _gla._n_extra(kind, has_seg)
  q_ref, k_ref, w_ref, do_ref = refs[:4]
  e_refs = refs[4:4 + ne]
  dhT_ref, dhs_ref, dh0_ref, dv_ref, scr = refs[4 + ne:]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    scr[...] = dhT_ref[...].astype(f32)

  dh = scr[...]
  dhs_ref[...] = dh.astype(dhs_ref.dtype)
  gv = _gla._view(kind, tuple(r[...] for r in e_refs), C, has_seg)
  dh, dvn = bwd_step(dh, q_ref[...], k_ref[...], w_ref[...], do_ref[...], kind, gv, scale, C)
  dv_ref[...] = dvn.astype(dv_ref.dtype)
  scr[...] = dh

  @pl.when(c == NT - 1)
  def _():
    dh0_ref[...] = dh


def state_bwd(q, k, w, do, gates, dhT, *, kind, C, H, scale, backend, interpret, seg=()):
  """Reverse pass over chunks. Returns (dhs [B,H,NT,Kp,Vp] f32: gradient of the state leaving
  each chunk, dh0 [B,H,Kp,Vp] f32, dv_new [B,Tp,H*Vp] f32)."""
  B, Tp, HK = q.shape
  Kp, Vp = HK // H, do.shape[-1] // H
  NT = Tp // C
  out_shape = [jax.ShapeDtypeStruct((B, H, NT, Kp, Vp), f32),
               jax.ShapeDtypeStruct((B, H, Kp, Vp), f32),
               jax.ShapeDtypeStruct(do.shape, f32)]
  args = (q, k, w, do, *gates, *seg, dhT)
  statics = dict(kind=kind, NT=NT, C=C, scale=scale, has_seg=bool(seg))
  if backend == "tpu":
    cidx = lambda c: NT - 1 - c
    xs = pl.BlockSpec((None, C, Kp), lambda b, h, c: (b, cidx(c), h))
    ys = pl.BlockSpec((None, C, Vp), lambda b, h, c: (b, cidx(c), h))
    st = pl.BlockSpec((None, None, Kp, Vp), lambda b, h, c: (b, h, 0, 0))
    return pl.pallas_call(
        functools.partial(_state_bwd_kernel_tpu, **statics), out_shape=out_shape,
        grid=(B, H, NT),
        in_specs=[xs, xs, xs, ys, *_gla._gate_specs_chunk(kind, C, Kp, cidx),
                  *_gla.seg_specs(seg, C, cidx), st],
        out_specs=[pl.BlockSpec((None, None, None, Kp, Vp),
                                lambda b, h, c: (b, h, cidx(c), 0, 0)), st, ys],
        scratch_shapes=[pltpu.VMEM((Kp, Vp), f32)],
        compiler_params=None if interpret else cm.compiler_params(
            "tpu", ("parallel", "parallel", "arbitrary")),
        interpret=cm.interpret_arg(interpret), name="linjax_delta_state_bwd")(*args)
  BV = min(Vp, 64)                    # V tiles: everything here is linear in the V slice
  NV = Vp // BV
  xs = pl.BlockSpec((None, Tp, Kp), lambda b, h, iv: (b, 0, h))
  ys = pl.BlockSpec((None, Tp, BV), lambda b, h, iv: (b, 0, h * NV + iv))
  gs = _gla.gate_specs_row(kind, Tp, NT, C, Kp) + _gla.seg_specs(seg, C, NT=NT, Tp=Tp)
  st = pl.BlockSpec((None, None, Kp, BV), lambda b, h, iv: (b, h, 0, iv))
  return pl.pallas_call(
      functools.partial(_state_bwd_kernel_gpu, **statics), out_shape=out_shape,
      grid=(B, H, NV), in_specs=[xs, xs, xs, ys, *gs, st],
      out_specs=[pl.BlockSpec((None, None, NT, Kp, BV), lambda b, h, iv: (b, h, 0, 0, iv)),
                 st, ys],
      compiler_params=None if interpret else cm.compiler_params("gpu", None, num_warps=4,
                                                                num_stages=2),
      interpret=cm.interpret_arg(interpret), name="linjax_delta_state_bwd")(*args)


# ----------------------------------------------------------------------------- the op

@functools.lru_cache(maxsize=None)
def _make_core(gated, C, H, scale, backend, interpret):
  kw = dict(C=C, H=H, scale=scale, backend=backend, interpret=interpret)
  kind = "scalar" if gated else "none"

  def wu(k, v, beta, g, rcol):
    _, w, u, _ = _wy(k, v, beta, g, C, H, rcol)
    return w, u

  def forward(q, k, v, beta, g, h0, seg):
    dt = q.dtype
    w, u = wu(k, v, beta, g, seg[0] if seg else None)
    wl = _to_layout(w).astype(dt)
    gates = _gla.gate_arrays(g, kind, C, H) if gated else ()
    hs, hT, vnew = _gla.state_pass(k, _to_layout(u).astype(dt), gates, h0, reverse=False,
                                   kind=kind, w=wl, seg=seg, **kw)
    return wl, gates, hs, hT, vnew

  def fwd(q, k, v, beta, g, h0, rcol, rrow):
    seg = () if rcol is None else (rcol, rrow)
    _, gates, hs, hT, vnew = forward(q, k, v, beta, g, h0, seg)
    o = _gla.output(q, k, vnew, gates, hs, kind=kind, seg=seg, **kw)
    return (o, hT), (q, k, v, beta, g, h0, rcol, rrow)

  def bwd(res, cts):
    q, k, v, beta, g, h0, rcol, rrow = res
    seg = () if rcol is None else (rcol, rrow)
    do, dhT = cts
    dt = q.dtype
    do = do.astype(dt)
    (w, u), wy_vjp = jax.vjp(lambda k, v, beta, g: wu(k, v, beta, g, rcol), k, v, beta, g)
    wl, gates, hs, hT, vnew = forward(q, k, v, beta, g, h0, seg)
    dhs, dh0, dvn = state_bwd(q, k, wl, do, gates, dhT.astype(f32), kind=kind, seg=seg, **kw)
    dq, dk, _ = _gla.grads(q, k, vnew, gates, hs, do, dhs.astype(hs.dtype), kind=kind,
                           seg=seg, **kw)
    # back through the WY prep: dw = -dv_new h_c^T, du = dv_new (per chunk, fp32)
    dvc = _from_layout(dvn, C, H)                                  # [B, NT, H, C, Vp]
    dw = -jnp.einsum("bnhcv,bhnkv->bnhck", dvc, hs.astype(f32))
    dk_wy, dv, dbeta, dg_wy = wy_vjp((dw, dvc))
    dg = None
    if gated:
      t = _gla.gate_token_grad(q, k, dq, dk, "scalar", H)          # [B, Tp, H]
      t = t.at[:, -1].add((hT * dhT).sum((2, 3)))
      # w reads h_c, the state at the last token of chunk c - 1
      read = (w * dw).sum((3, 4))                                 # [B, NT, H]
      t = t.at[:, C - 1:-1:C].add(read[:, 1:])
      dg = cm.reverse_cumsum(t, axis=1) + dg_wy
    zero = lambda x: None if x is None else jnp.zeros_like(x)
    return (dq.astype(q.dtype), (dk + dk_wy).astype(k.dtype), dv.astype(v.dtype), dbeta, dg,
            dh0, zero(rcol), zero(rrow))

  @jax.custom_vjp
  def core(q, k, v, beta, g, h0, rcol, rrow):
    return fwd(q, k, v, beta, g, h0, rcol, rrow)[0]

  core.defvjp(fwd, bwd)
  return core


def delta_rule_chunk_impl(q, k, v, beta, g, *, scale, initial_state, output_final_state,
                          cu_seqlens, chunk_size, interpret, backend, segment_ids=None):
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = float(K ** -0.5 if scale is None else scale)
  C = int(chunk_size)
  if C < 16 or C & (C - 1):
    raise ValueError(f"chunk_size must be a power of two >= 16, got {C}")
  if g is not None and g.ndim != 3:
    raise ValueError(f"delta rule gate g must be [B, T, H] (one decay per head), got {g.shape}")
  _gla._check_segments(segment_ids, cu_seqlens, B, T)
  if cu_seqlens is not None:
    if B != 1:
      raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    L, (qu, ku, vu, bu, gu) = cm.varlen_unpack(cu_seqlens, T, q, k, v, beta, g)
    o, S = delta_rule_chunk_impl(qu, ku, vu, bu, gu, scale=scale, initial_state=initial_state,
                                 output_final_state=True, cu_seqlens=None, chunk_size=C,
                                 interpret=interpret, backend=backend)
    return cm.varlen_repack(cu_seqlens, T, o), (S if output_final_state else None)
  Kp, Vp = cm.padded_dim(K, backend), cm.padded_dim(V, backend)
  Tp = -(-max(T, 1) // C) * C
  ql, kl = cm.to_kernel_layout(q, Tp, Kp), cm.to_kernel_layout(k, Tp, Kp)
  vl = cm.to_kernel_layout(v.astype(q.dtype), Tp, Vp)
  bl = cm.pad_axis(beta.astype(f32), 1, Tp)
  gl = None if g is None else cm.pad_axis(g.astype(f32), 1, Tp)
  if initial_state is None:
    h0 = jnp.zeros((B, H, Kp, Vp), f32)
  else:
    h0 = cm.pad_axis(cm.pad_axis(initial_state.astype(f32), 2, Kp), 3, Vp)
  rcol, rrow = ((None, None) if segment_ids is None
                else _gla.segment_arrays(segment_ids, Tp, C))
  core = _make_core(g is not None, C, H, scale, backend, interpret)
  o, S = core(ql, kl, vl, bl, gl, h0, rcol, rrow)
  o = cm.from_kernel_layout(o, T, H, V).astype(v.dtype)
  return o, (S[:, :, :K, :V] if output_final_state else None)
