"""Chunkwise gated linear attention (no gate / per-head gate / per-channel GLA gate) in Pallas.

  S_t = exp(g_t) * S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t      (DESIGN.md)

Forward, in the kernel layout of `_common.py` (chunk size C, b = chunk-local cumsum of g):
  kernel A (`state_pass`): h_c = state entering chunk c, sequential over chunks;
      h_{c+1} = exp(b_last) h_c + (k * exp(b_last - b))^T v
  kernel B (`output`):     every chunk in parallel;
      o = scale (q * exp(b)) h_c + scale [(q k^T) * exp(b_i - b_j)]_{j <= i} v
Backward mirrors it: the same state kernel run in reverse gives dh_c (gradient of the state
leaving chunk c) and dh0; kernel `grads` gives dq, dk, dv for all chunks in parallel; the gate
gradient follows outside from dL/d(cumsum g)_t = q_t dq_t - k_t dk_t (+ S_T dS_T at the end),
reverse-cumsummed over the sequence.

Per-channel gates never form exp of a positive number: the intra-chunk scores are built in
sub-chunks of 16 (`_channel_intra`): off-diagonal blocks as matmuls of factors anchored at
the token before the query sub-chunk (both <= 1), diagonal blocks one key column at a time,
masked (i >= j) before the exp.

Packed rows (segment_ids [B, T]; the state resets wherever the id changes): each token
carries its segment run counted from the run of the state entering its chunk
(`segment_arrays`), and `gate_view` turns that into four masks the step helpers apply:
same-segment pairs in the intra-chunk scores, only the entering run reads h_c, only the
chunk's last run writes h_{c+1}, and the decay of h_c through the chunk is cut at a
boundary. The gate-gradient identity still holds, since every surviving term is a
q_i k_j exp(B_i - B_j) pair inside one segment.

Two lowerings of the same step functions: GPU (Pallas Triton) runs the sequential state pass
as a loop inside one program per (batch, head, V tile); TPU (Pallas Mosaic) runs it as an
"arbitrary" grid axis over chunks with the state in a VMEM scratch buffer.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common as cm

f32 = jnp.float32
NEG_INF = float("-inf")


# --------------------------------------------------------------------------- step math

def _mm(a, b, dims):
  # fp32 inputs: full precision (no TF32 on GPU), so fp32 results match the reference.
  prec = lax.Precision.HIGHEST if a.dtype == f32 else None
  return lax.dot_general(a, b, (dims, ((), ())), precision=prec, preferred_element_type=f32)


def _dot(a, b):
  return _mm(a, b, ((1,), (0,)))


def _dot_tn(a, b):  # a^T b
  return _mm(a, b, ((0,), (0,)))


def _dot_nt(a, b):  # a b^T
  return _mm(a, b, ((1,), (1,)))


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def gate_view(kind, raw, C, seg=None):
  """Derived per-chunk gate quantities from the loaded gate blocks.

  scalar: raw = (bcol [C,1], brow [1,C]) -> dict(bcol, brow, blast [1,1])
  channel: raw = (gc [C,Kp], gcol [Kp,1]) -> dict(gc, glast_row [1,Kp], gcol)
  seg (packed rows): (rcol [C,1], rrow [1,C]) f32, each token's segment run counted from
  the run the entering state belongs to (0 = that run) -> adds the masks
    same [C,C] (i, j in one segment), carry [C,1] (token sees the entering state),
    last [C,1] (token reaches the leaving state), through [1,1] (no boundary in the chunk).
  """
  if kind == "none":
    gv = {}
  elif kind == "scalar":
    bcol, brow = raw
    blast = jnp.sum(jnp.where(_iota(brow.shape, 1) == C - 1, brow, 0.0), axis=1, keepdims=True)
    gv = dict(bcol=bcol, brow=brow, blast=blast)
  else:
    gc, gcol = raw
    glast = jnp.sum(jnp.where(_iota(gc.shape, 0) == C - 1, gc, 0.0), axis=0, keepdims=True)
    gv = dict(gc=gc, glast_row=glast, gcol=gcol)
  if seg is not None:
    rcol, rrow = seg
    rlast = jnp.sum(jnp.where(_iota(rrow.shape, 1) == C - 1, rrow, 0.0), axis=1, keepdims=True)
    gv.update(same=rcol == rrow, carry=rcol == 0.0, last=rcol == rlast, through=rlast == 0.0)
  return gv


def _mask(x, gv, name):
  """x where the segment mask `name` holds, 0 elsewhere (no-op without segments)."""
  return jnp.where(gv[name], x, 0.0) if name in gv else x


def _to_end(x, kind, gv):
  """x * exp(b_last - b): decay each row to the end of its chunk (x: [C, Kp] f32); rows
  outside the chunk's last segment do not reach the leaving state."""
  if kind == "scalar":
    x = x * jnp.exp(gv["blast"] - gv["bcol"])
  elif kind == "channel":
    x = x * jnp.exp(gv["glast_row"] - gv["gc"])
  return _mask(x, gv, "last")


def _from_start(x, kind, gv):
  """x * exp(b): decay from the chunk start (x: [C, Kp] f32); rows outside the segment
  of the entering state do not see it."""
  if kind == "scalar":
    x = x * jnp.exp(gv["bcol"])
  elif kind == "channel":
    x = x * jnp.exp(gv["gc"])
  return _mask(x, gv, "carry")


def _decay_state(h, kind, gv):
  if kind == "scalar":
    h = h * jnp.exp(gv["blast"])
  elif kind == "channel":
    h = h * jnp.exp(gv["gcol"])
  return _mask(h, gv, "through")


def state_step(h, x, y, kind, gv, reverse, scale, w=None):
  """One chunk of the state pass. Forward: x = k, y = v; reverse: x = q, y = do.

  Returns (new state, y actually used). With w (delta rule): y <- y - w h (= v_new).
  """
  dt = x.dtype
  if w is not None:
    y = y.astype(f32) - _dot(w, h.astype(dt))
  xf = x.astype(f32)
  xd = _from_start(xf, kind, gv) * scale if reverse else _to_end(xf, kind, gv)
  h = _decay_state(h, kind, gv) + _dot_tn(xd.astype(dt), y.astype(dt))
  return h, y


def _causal(C, gv=None):
  """[C, C] bool: j <= i (and, for packed rows, i and j in one segment)."""
  mask = _iota((C, C), 0) >= _iota((C, C), 1)
  return mask & gv["same"] if gv is not None and "same" in gv else mask


def _scalar_decay(kind, gv, C):
  """[C, C] f32 decay matrix exp(b_i - b_j) on i >= j, 0 above (mask before exp)."""
  mask = _causal(C, gv)
  if kind == "none":
    return jnp.where(mask, 1.0, 0.0).astype(f32)
  return jnp.exp(jnp.where(mask, gv["bcol"] - gv["brow"], NEG_INF))


SUB = 16  # sub-chunk of the per-channel intra-chunk scores


def _channel_intra(q_ref, k_ref, gc_ref, C, dpm=None):
  """Per-channel intra-chunk terms A_ij = sum_k q_ik k_jk exp(gc_ik - gc_jk) (j <= i), built
  in sub-chunks of 16 (the layout of fla's chunk_gla): a diagonal [16, 16] block one key
  column at a time, with the decay masked before the exp ([16, K] exps per column, not
  [C, K]); each sub-chunk's off-diagonal row as one matmul of q exp(gc - gc_p) by
  k exp(gc_p - gc) (keys before the sub-chunk, zero after), p the token before the query
  sub-chunk (both factors <= 1).

  Returns A [C, C] f32 and, with dpm (masked dL/dA [C, C] f32), the intra-chunk dq, dk
  [C, Kp] f32. Blocks move into place through 0/1 selection matmuls in f32 (exact).
  """
  s = min(SUB, C)
  m = C // s
  Kp = q_ref.shape[-1]
  dt = q_ref.dtype
  rows_s = _iota((s, 1), 0)
  cols_ss = _iota((s, s), 1)
  A = jnp.zeros((C, C), f32)
  grads = dpm is not None
  if grads:
    dq = jnp.zeros((C, Kp), f32)
    dk = jnp.zeros((C, Kp), f32)
  for a in range(m):
    lo = a * s
    E = (_iota((s, C), 1) == _iota((s, C), 0) + lo).astype(f32)      # row r -> column lo+r
    qa = q_ref[pl.ds(lo, s), :].astype(f32)
    ga = gc_ref[pl.ds(lo, s), :]
    if grads:
      dpm_rows = _dot(E, dpm)                                         # [s, C]
      dA_diag = _dot_nt(dpm_rows, E)                                  # [s, s]

    def diag(r, carry, lo=lo, qa=qa, ga=ga):
      kj = k_ref[pl.ds(lo + r, 1), :].astype(f32)                     # [1, Kp]
      gj = gc_ref[pl.ds(lo + r, 1), :]
      e = jnp.exp(jnp.where(rows_s >= r, ga - gj, NEG_INF))           # [s, Kp]
      qe = qa * e
      col = jnp.sum(qe * kj, axis=1, keepdims=True)                   # [s, 1]
      D = carry[0] + jnp.where(cols_ss == r, col, 0.0)
      if not grads:
        return (D,)
      _, dqa, dka = carry
      dpc = jnp.sum(jnp.where(cols_ss == r, dA_diag, 0.0), axis=1, keepdims=True)
      dqa = dqa + dpc * kj * e
      dka = dka + jnp.where(rows_s == r, jnp.sum(dpc * qe, axis=0, keepdims=True), 0.0)
      return (D, dqa, dka)

    init = (jnp.zeros((s, s), f32),)
    if grads:
      init += (jnp.zeros((s, Kp), f32), jnp.zeros((s, Kp), f32))
    out = lax.fori_loop(0, s, diag, init)
    A_row = _dot(out[0], E)                                           # [s, C]
    if grads:
      dqa, dka = out[1], out[2]
    if a > 0:  # keys j < lo; whole-chunk arrays, as Triton wants power-of-two shapes
      gp = gc_ref[pl.ds(lo - 1, 1), :]                                # [1, Kp]
      e_q = jnp.exp(ga - gp)                                          # <= 1
      qd = (qa * e_q).astype(dt)
      e_k = jnp.exp(jnp.where(_iota((C, 1), 0) < lo, gp - gc_ref[...], NEG_INF))  # [C, Kp]
      kd = (k_ref[...].astype(f32) * e_k).astype(dt)                  # 0 from row lo on
      A_row = A_row + _dot_nt(qd, kd)
      if grads:
        dqa = dqa + _dot(dpm_rows.astype(dt), kd) * e_q
        dk = dk + _dot_tn(dpm_rows.astype(dt), qd) * e_k
    A = A + _dot_tn(E, A_row)
    if grads:
      dq = dq + _dot_tn(E, dqa)
      dk = dk + _dot_tn(E, dka)
  return (A, dq, dk) if grads else (A,)


# --------------------------------------------------------------------------- kernels

def _n_gate_refs(kind):
  return {"none": 0, "scalar": 2, "channel": 2}[kind]


def _n_extra(kind, has_seg):
  """Gate refs, then (packed rows) the two segment-run refs, both column + row pairs."""
  return _n_gate_refs(kind) + (2 if has_seg else 0)


def _view(kind, loaded, C, has_seg):
  """gate_view from the loaded gate (+ segment) blocks of one chunk."""
  ng = _n_gate_refs(kind)
  return gate_view(kind, tuple(loaded[:ng]) if ng else None, C,
                   tuple(loaded[ng:]) if has_seg else None)


def _load_chunk(refs, c, rows):
  """GPU loops: (column block rows, row block c) of each (column, row) pair of refs."""
  return tuple(r[rows, :] if i % 2 == 0 else r[c] for i, r in enumerate(refs))


def _state_kernel_gpu(*refs, kind, NT, C, H, reverse, scale, has_w, has_seg):
  ne = _n_extra(kind, has_seg)
  x_ref, y_ref = refs[:2]
  e_refs = refs[2:2 + ne]
  i = 2 + ne
  w_ref = refs[i] if has_w else None
  i += has_w
  h0_ref = refs[i]
  hs_ref, hT_ref = refs[i + 1:i + 3]
  ynew_ref = refs[i + 3] if has_w else None

  def body(it, h):
    c = NT - 1 - it if reverse else it
    rows = pl.ds(pl.multiple_of(c * C, C), C)
    gv = _view(kind, _load_chunk(e_refs, c, rows), C, has_seg)
    hs_ref[c] = h.astype(hs_ref.dtype)
    w = w_ref[rows, :] if has_w else None
    h, y = state_step(h, x_ref[rows, :], y_ref[rows, :], kind, gv, reverse, scale, w)
    if has_w:
      ynew_ref[rows, :] = y.astype(ynew_ref.dtype)
    return h

  h = lax.fori_loop(0, NT, body, h0_ref[...].astype(f32))
  hT_ref[...] = h


def _state_kernel_tpu(*refs, kind, NT, C, H, reverse, scale, has_w, has_seg):
  ne = _n_extra(kind, has_seg)
  x_ref, y_ref = refs[:2]
  e_refs = refs[2:2 + ne]
  i = 2 + ne
  w_ref = refs[i] if has_w else None
  i += has_w
  h0_ref = refs[i]
  hs_ref, hT_ref = refs[i + 1:i + 3]
  ynew_ref = refs[i + 3] if has_w else None
  scr = refs[-1]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    scr[...] = h0_ref[...].astype(f32)

  h = scr[...]
  hs_ref[...] = h.astype(hs_ref.dtype)
  gv = _view(kind, tuple(r[...] for r in e_refs), C, has_seg)
  w = w_ref[...] if has_w else None
  h, y = state_step(h, x_ref[...], y_ref[...], kind, gv, reverse, scale, w)
  if has_w:
    ynew_ref[...] = y.astype(ynew_ref.dtype)
  scr[...] = h

  @pl.when(c == NT - 1)
  def _():
    hT_ref[...] = h


def _gate_specs_chunk(kind, C, Kp, cidx):
  if kind == "scalar":
    return [pl.BlockSpec((None, None, C, 1), lambda b, h, c: (b, h, cidx(c), 0)),
            pl.BlockSpec((None, None, None, 1, C), lambda b, h, c: (b, h, cidx(c), 0, 0))]
  if kind == "channel":
    return [pl.BlockSpec((None, C, Kp), lambda b, h, c: (b, cidx(c), h)),
            pl.BlockSpec((None, None, None, Kp, 1), lambda b, h, c: (b, h, cidx(c), 0, 0))]
  return []


def seg_specs(seg, C, cidx=None, NT=None, Tp=None):
  """BlockSpecs of the segment runs (column [B, Tp, 1], row [B, NT, 1, C]): one chunk per
  program (grid (b, h, c) with cidx, or (b, h, c, iv) without), or whole rows (GPU loops)."""
  if not seg:
    return []
  if Tp is not None:
    return [pl.BlockSpec((None, Tp, 1), lambda b, h, iv: (b, 0, 0)),
            pl.BlockSpec((None, NT, 1, C), lambda b, h, iv: (b, 0, 0, 0))]
  if cidx is not None:
    return [pl.BlockSpec((None, C, 1), lambda b, h, c: (b, cidx(c), 0)),
            pl.BlockSpec((None, None, 1, C), lambda b, h, c: (b, cidx(c), 0, 0))]
  return [pl.BlockSpec((None, C, 1), lambda b, h, c, iv: (b, c, 0)),
          pl.BlockSpec((None, None, 1, C), lambda b, h, c, iv: (b, c, 0, 0))]


def state_pass(x, y, gates, h0, *, kind, C, H, reverse, scale, backend, interpret, w=None,
               state_dtype=None, seg=()):
  """Sequential pass over chunks. Returns (hs [B,H,NT,Kp,Vp], hT [B,H,Kp,Vp] f32, y_new).
  seg: () or the segment runs (column, row) of packed rows (see `segment_arrays`)."""
  B, Tp, HK = x.shape
  Kp, Vp = HK // H, y.shape[-1] // H
  NT = Tp // C
  dt = x.dtype if state_dtype is None else state_dtype
  has_w = w is not None
  out_shape = [jax.ShapeDtypeStruct((B, H, NT, Kp, Vp), dt),
               jax.ShapeDtypeStruct((B, H, Kp, Vp), f32)]
  if has_w:
    out_shape.append(jax.ShapeDtypeStruct(y.shape, x.dtype))
  args = [x, y, *gates, *seg] + ([w] if has_w else []) + [h0]
  statics = dict(kind=kind, NT=NT, C=C, H=H, reverse=reverse, scale=scale, has_w=has_w,
                 has_seg=bool(seg))
  if backend == "tpu":
    cidx = (lambda c: NT - 1 - c) if reverse else (lambda c: c)
    xs = pl.BlockSpec((None, C, Kp), lambda b, h, c: (b, cidx(c), h))
    ys = pl.BlockSpec((None, C, Vp), lambda b, h, c: (b, cidx(c), h))
    st = pl.BlockSpec((None, None, Kp, Vp), lambda b, h, c: (b, h, 0, 0))
    in_specs = ([xs, ys, *_gate_specs_chunk(kind, C, Kp, cidx), *seg_specs(seg, C, cidx)]
                + ([xs] if has_w else []) + [st])
    out_specs = [pl.BlockSpec((None, None, None, Kp, Vp), lambda b, h, c: (b, h, cidx(c), 0, 0)),
                 st] + ([ys] if has_w else [])
    return pl.pallas_call(
        functools.partial(_state_kernel_tpu, **statics), out_shape=out_shape,
        grid=(B, H, NT), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((Kp, Vp), f32)],
        compiler_params=None if interpret else cm.compiler_params(
            "tpu", ("parallel", "parallel", "arbitrary")),
        interpret=cm.interpret_arg(interpret), name="linjax_state_pass")(*args)
  BV = min(Vp, 64)
  NV = Vp // BV
  xs = pl.BlockSpec((None, Tp, Kp), lambda b, h, iv: (b, 0, h))
  ys = pl.BlockSpec((None, Tp, BV), lambda b, h, iv: (b, 0, h * NV + iv))
  st = pl.BlockSpec((None, None, Kp, BV), lambda b, h, iv: (b, h, 0, iv))
  in_specs = ([xs, ys, *gate_specs_row(kind, Tp, NT, C, Kp), *seg_specs(seg, C, NT=NT, Tp=Tp)]
              + ([xs] if has_w else []) + [st])
  out_specs = [pl.BlockSpec((None, None, NT, Kp, BV), lambda b, h, iv: (b, h, 0, 0, iv)),
               st] + ([ys] if has_w else [])
  return pl.pallas_call(
      functools.partial(_state_kernel_gpu, **statics), out_shape=out_shape,
      grid=(B, H, NV), in_specs=in_specs, out_specs=out_specs,
      compiler_params=None if interpret else cm.compiler_params("gpu", None, num_warps=4,
                                                                num_stages=2),
      interpret=cm.interpret_arg(interpret), name="linjax_state_pass")(*args)


def gate_specs_row(kind, Tp, NT, C, Kp):
  """GPU loops: BlockSpecs of the gate arrays of a whole (batch, head) row."""
  if kind == "scalar":
    return [pl.BlockSpec((None, None, Tp, 1), lambda b, h, iv: (b, h, 0, 0)),
            pl.BlockSpec((None, None, NT, 1, C), lambda b, h, iv: (b, h, 0, 0, 0))]
  if kind == "channel":
    return [pl.BlockSpec((None, Tp, Kp), lambda b, h, iv: (b, 0, h)),
            pl.BlockSpec((None, None, NT, Kp, 1), lambda b, h, iv: (b, h, 0, 0, 0))]
  return []


def _output_kernel(*refs, kind, C, scale, has_seg):
  ne = _n_extra(kind, has_seg)
  q_ref, k_ref, v_ref = refs[:3]
  e_refs = refs[3:3 + ne]
  h_ref, o_ref = refs[3 + ne:]
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  dt = q.dtype
  gv = _view(kind, tuple(r[...] for r in e_refs), C, has_seg)
  qf = q.astype(f32)
  if kind == "channel":
    (a,) = _channel_intra(q_ref, k_ref, e_refs[0], C)
    a = _mask(a, gv, "same")
  else:
    a = _dot_nt(q, k) * _scalar_decay(kind, gv, C)
  qg = _from_start(qf, kind, gv)
  o = _dot(qg.astype(dt), h_ref[...].astype(dt)) + _dot(a.astype(dt), v)
  o_ref[...] = (o * scale).astype(o_ref.dtype)


def _v_tiles(backend, dtype, Vp):
  """V tiles for the parallel kernels. fp32 on GPU: 64-wide tiles, so the fp32 [K, V] state
  blocks of a program stay within Triton's shared memory / registers at head dim 128+.
  Everything in those kernels is linear in the V slice except the scores q k^T (recomputed
  per tile); dq and dk come back as per-tile partial sums."""
  if backend == "gpu" and dtype == f32 and Vp > 64:
    return Vp // 64
  return 1


def _chunk_specs(kind, C, Kp, Vp, NV=1):
  BV = Vp // NV
  qs = pl.BlockSpec((None, C, Kp), lambda b, h, c, iv: (b, c, h))
  vs = pl.BlockSpec((None, C, BV), lambda b, h, c, iv: (b, c, h * NV + iv))
  hs = pl.BlockSpec((None, None, None, Kp, BV), lambda b, h, c, iv: (b, h, c, 0, iv))
  gs = [pl.BlockSpec(g.block_shape, (lambda m: lambda b, h, c, iv: m(b, h, c))(g.index_map))
        for g in _gate_specs_chunk(kind, C, Kp, lambda c: c)]
  return qs, vs, gs, hs


def output(q, k, v, gates, hs, *, kind, C, H, scale, backend, interpret, seg=()):
  B, Tp, HK = q.shape
  Kp, Vp = HK // H, v.shape[-1] // H
  NT = Tp // C
  NV = _v_tiles(backend, q.dtype, Vp)
  qs, vs, gs, hsp = _chunk_specs(kind, C, Kp, Vp, NV)
  cp = None if interpret else (
      cm.compiler_params("tpu", ("parallel",) * 4) if backend == "tpu"
      else cm.compiler_params("gpu", None, num_warps=4, num_stages=2))
  return pl.pallas_call(
      functools.partial(_output_kernel, kind=kind, C=C, scale=scale, has_seg=bool(seg)),
      out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype), grid=(B, H, NT, NV),
      in_specs=[qs, qs, vs, *gs, *seg_specs(seg, C), hsp], out_specs=vs, compiler_params=cp,
      interpret=cm.interpret_arg(interpret), name="linjax_chunk_output")(
          q, k, v, *gates, *seg, hs)


def _grads_kernel(*refs, kind, C, scale, has_seg):
  ne = _n_extra(kind, has_seg)
  q_ref, k_ref, v_ref = refs[:3]
  e_refs = refs[3:3 + ne]
  h_ref, do_ref, dh_ref, dq_ref, dk_ref, dv_ref = refs[3 + ne:]
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  dt = q.dtype
  h, dh = h_ref[...].astype(dt), dh_ref[...].astype(dt)
  gv = _view(kind, tuple(r[...] for r in e_refs), C, has_seg)
  qf, kf = q.astype(f32), k.astype(f32)
  if kind == "channel":
    dpm = jnp.where(_causal(C, gv), _dot_nt(do, v), 0.0) * scale
    a, dq, dk = _channel_intra(q_ref, k_ref, e_refs[0], C, dpm=dpm)
    a = _mask(a, gv, "same") * scale
  else:
    dmat = _scalar_decay(kind, gv, C)
    a = _dot_nt(q, k) * dmat * scale
    dp = (_dot_nt(do, v) * dmat * scale).astype(dt)
    dq = _dot(dp, k)
    dk = _dot_tn(dp, q)
  dq = dq + _from_start(_dot_nt(do, h), kind, gv) * scale
  dk = dk + _to_end(_dot_nt(v, dh), kind, gv)
  kd = _to_end(kf, kind, gv).astype(dt)
  dv = _dot_tn(a.astype(dt), do) + _dot(kd, dh)
  dq_ref[...] = dq
  dk_ref[...] = dk
  dv_ref[...] = dv


def grads(q, k, v, gates, hs, do, dhs, *, kind, C, H, scale, backend, interpret, seg=()):
  B, Tp, HK = q.shape
  Kp, Vp = HK // H, v.shape[-1] // H
  NT = Tp // C
  NV = _v_tiles(backend, q.dtype, Vp)
  qs, vs, gs, hsp = _chunk_specs(kind, C, Kp, Vp, NV)
  cp = None if interpret else (
      cm.compiler_params("tpu", ("parallel",) * 4) if backend == "tpu"
      else cm.compiler_params("gpu", None, num_warps=8 if Kp * Vp // NV > 64 * 64 else 4,
                              num_stages=1))
  # dq, dk: one partial sum per V tile, [NV, B, Tp, H*Kp], summed below (NV = 1: a reshape).
  ps = pl.BlockSpec((None, None, C, Kp), lambda b, h, c, iv: (iv, b, c, h))
  out_shape = [jax.ShapeDtypeStruct((NV,) + q.shape, f32),
               jax.ShapeDtypeStruct((NV,) + k.shape, f32),
               jax.ShapeDtypeStruct(v.shape, f32)]
  dq, dk, dv = pl.pallas_call(
      functools.partial(_grads_kernel, kind=kind, C=C, scale=scale, has_seg=bool(seg)),
      out_shape=out_shape, grid=(B, H, NT, NV),
      in_specs=[qs, qs, vs, *gs, *seg_specs(seg, C), hsp, vs, hsp], out_specs=[ps, ps, vs],
      compiler_params=cp, interpret=cm.interpret_arg(interpret), name="linjax_chunk_grads")(
          q, k, v, *gates, *seg, hs, do, dhs)
  return dq.sum(0), dk.sum(0), dv


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


def gate_token_grad(q, k, dq, dk, kind, H):
  """dL/d(global cumsum of g) per token, without the final-state term."""
  t = q.astype(f32) * dq - k.astype(f32) * dk               # [B, Tp, H*Kp]
  if kind == "scalar":
    B, Tp, HK = t.shape
    t = t.reshape(B, Tp, H, HK // H).sum(-1)
  return t


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


@functools.lru_cache(maxsize=None)
def _make_core(kind, C, H, scale, backend, interpret):
  kw = dict(kind=kind, C=C, H=H, scale=scale, backend=backend, interpret=interpret)

  def fwd(q, k, v, g, h0, rcol, rrow):
    seg = () if rcol is None else (rcol, rrow)
    gates = gate_arrays(g, kind, C, H)
    hs, hT = state_pass(k, v, gates, h0, reverse=False, seg=seg, **kw)[:2]
    o = output(q, k, v, gates, hs, seg=seg, **kw)
    return (o, hT), (q, k, v, g, h0, rcol, rrow, hs, hT)

  def bwd(res, cts):
    q, k, v, g, h0, rcol, rrow, hs, hT = res
    seg = () if rcol is None else (rcol, rrow)
    do, dhT = cts
    do = do.astype(v.dtype)
    gates = gate_arrays(g, kind, C, H)
    dhs, dh0 = state_pass(q, do, gates, dhT.astype(f32), reverse=True, seg=seg, **kw)[:2]
    dq, dk, dv = grads(q, k, v, gates, hs, do, dhs, seg=seg, **kw)
    if kind == "none":
      dg = None
    else:
      # every term is x_i y_j exp(B_i - B_j) inside one segment, so the identity holds
      # with the segment masks too
      t = gate_token_grad(q, k, dq, dk, kind, H)
      fin = hT * dhT                                          # [B, H, Kp, Vp]
      fin = fin.sum((2, 3)) if kind == "scalar" else fin.sum(3).reshape(fin.shape[0], -1)
      t = t.at[:, -1].add(fin)
      dg = cm.reverse_cumsum(t, axis=1)
    zero = lambda x: None if x is None else jnp.zeros_like(x)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dh0,
            zero(rcol), zero(rrow))

  @jax.custom_vjp
  def core(q, k, v, g, h0, rcol, rrow):
    return fwd(q, k, v, g, h0, rcol, rrow)[0]

  core.defvjp(fwd, bwd)
  return core


def _check_segments(segment_ids, cu_seqlens, B, T):
  if segment_ids is None:
    return
  if cu_seqlens is not None:
    raise ValueError("pass either `cu_seqlens` (B = 1 packing) or `segment_ids`, not both")
  if getattr(segment_ids, "shape", None) != (B, T):
    raise ValueError(f"`segment_ids` must have shape [B, T] = {(B, T)}, got "
                     f"{getattr(segment_ids, 'shape', None)}")


def gla_chunk_impl(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens,
                   chunk_size, interpret, backend, segment_ids=None):
  """The whole op for one backend ("gpu" or "tpu" style kernels)."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = float(K ** -0.5 if scale is None else scale)
  C = int(chunk_size)
  if C < 16 or C & (C - 1):
    raise ValueError(f"chunk_size must be a power of two >= 16, got {C}")
  kind = "none" if g is None else ("scalar" if g.ndim == 3 else "channel")
  _check_segments(segment_ids, cu_seqlens, B, T)
  if cu_seqlens is not None:
    if B != 1:
      raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    L, (qu, ku, vu, gu) = cm.varlen_unpack(cu_seqlens, T, q, k, v, g)
    o, S = gla_chunk_impl(qu, ku, vu, gu, scale=scale, initial_state=initial_state,
                          output_final_state=True, cu_seqlens=None, chunk_size=C,
                          interpret=interpret, backend=backend)
    return cm.varlen_repack(cu_seqlens, T, o), (S if output_final_state else None)
  Kp, Vp = cm.padded_dim(K, backend), cm.padded_dim(V, backend)
  Tp = -(-max(T, 1) // C) * C
  ql, kl = cm.to_kernel_layout(q, Tp, Kp), cm.to_kernel_layout(k, Tp, Kp)
  vl = cm.to_kernel_layout(v.astype(q.dtype), Tp, Vp)
  if kind == "scalar":
    gl = cm.pad_axis(g.astype(f32), 1, Tp)
  elif kind == "channel":
    gl = cm.to_kernel_layout(g.astype(f32), Tp, Kp)
  else:
    gl = None
  if initial_state is None:
    h0 = jnp.zeros((B, H, Kp, Vp), f32)
  else:
    h0 = cm.pad_axis(cm.pad_axis(initial_state.astype(f32), 2, Kp), 3, Vp)
  rcol, rrow = (None, None) if segment_ids is None else segment_arrays(segment_ids, Tp, C)
  core = _make_core(kind, C, H, scale, backend, interpret)
  o, S = core(ql, kl, vl, gl, h0, rcol, rrow)
  o = cm.from_kernel_layout(o, T, H, V).astype(v.dtype)
  return o, (S[:, :, :K, :V] if output_final_state else None)
