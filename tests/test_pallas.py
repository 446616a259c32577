"""Pallas kernels in interpret mode vs linjax.ops.reference: values and every gradient.

Interpret mode is Pallas' TPU interpreter with uninitialised memory filled with NaN and
out-of-bounds reads raising (`pltpu.InterpretParams`), so a kernel that reads what it never
wrote fails here. Both kernel structures are run: "gpu" (Triton-style, sequential loop inside
the kernel) and "tpu" (Mosaic-style, "arbitrary" grid axis with a VMEM scratch state, G
chunks per grid step). With the default shape rule small tests run the GPU structure's
two-pass forward and the TPU structure's fused one; `form=` tests the other two.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax.ops import reference as R
from pallas_kernels import tiling
from pallas_kernels.delta import delta_rule_chunk_impl
from pallas_kernels.gla import gla_chunk_impl
import pallas_kernels
from tests.helpers import load_module, rel_err

F32_TOL = 1e-4
BF16_TOL = 2e-2
# Gate gradients come from dL/dg_t = sum_{s>=t} (q_s dq_s - k_s dk_s): under strong gates
# (-10 / step) the true dg is ~e^-10 of the terms that cancel, so fp32 rounding shows at the
# 1e-3 level (fla has the same identity; its gate-gradient tolerance is 2e-2).
STRONG_DG_TOL = 2e-2
# Most tests use the plain (discharge) interpreter, which is fast; the ones marked NAN_CHECK
# use Pallas' TPU interpreter that fills uninitialised memory with NaN and raises on
# out-of-bounds reads (slower in wall time).
FAST = "plain"
NAN_CHECK = True


def _gate(key, kind, shape_bth, K, strength):
  if kind == "none":
    return None
  shape = shape_bth if kind == "scalar" else shape_bth + (K,)
  if strength == "strong":  # about -10 per step
    return -10.0 * jax.random.uniform(key, shape, minval=0.8, maxval=1.2)
  return jax.nn.log_sigmoid(jax.random.normal(key, shape) + 2.0)


def _inputs(seed, B, T, H, K, V, dtype, kind="scalar", strength="normal", beta=False,
            n_states=None, normalize_k=False):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, H, K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True) if normalize_k else k * K ** -0.5
  v = jax.random.normal(ks[2], (B, T, H, V))
  g = _gate(ks[3], kind, (B, T, H), K, strength)
  h0 = jax.random.normal(ks[4], (n_states or B, H, K, V)) * 0.5
  cast = lambda x: x.astype(dtype)
  args = dict(q=cast(q), k=cast(k), v=cast(v), g=g, h0=h0)
  if beta:
    args["beta"] = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))) * 2.0 * 0.9
  return args


def _compare(kernel_fn, ref_fn, args, tol, gtol, seed=0, dg_tol=None):
  """Values of o and final state, and gradients of every array argument."""
  names = [n for n, a in args.items() if a is not None]
  o_ref, s_ref = ref_fn(**args)
  o, s = kernel_fn(**args)
  assert o.dtype == args["v"].dtype and s.dtype == jnp.float32
  e = {"o": rel_err(o_ref, o), "S": rel_err(s_ref, s)}
  assert e["o"] <= tol and e["S"] <= tol, e
  kd, ks = jax.random.split(jax.random.PRNGKey(seed + 100))
  do = jax.random.normal(kd, o.shape)
  ds = jax.random.normal(ks, s.shape)

  def loss(fn, *xs):
    kw = dict(args)
    kw.update(zip(names, xs))
    o, s = fn(**kw)
    return (o.astype(jnp.float32) * do).sum() + (s * ds).sum()

  xs = [args[n] for n in names]
  g_ref = jax.grad(functools.partial(loss, ref_fn), range(len(xs)))(*xs)
  g_ker = jax.grad(functools.partial(loss, kernel_fn), range(len(xs)))(*xs)
  for n, a, b in zip(names, g_ref, g_ker):
    e["d" + n] = rel_err(a, b)
    assert e["d" + n] <= (dg_tol if (n == "g" and dg_tol) else gtol), (n, e)
  return e


def _gla_fns(C, backend, cu_seqlens=None, interpret=FAST, form="auto", segment_ids=None):
  def ker(q, k, v, g, h0):
    return gla_chunk_impl(q, k, v, g, scale=None, initial_state=h0, output_final_state=True,
                          cu_seqlens=cu_seqlens, chunk_size=C, interpret=interpret,
                          backend=backend, form=form, segment_ids=segment_ids)

  def ref(q, k, v, g, h0):
    return R.gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                 segment_ids=segment_ids)
  return ker, ref


def _delta_fns(C, backend, cu_seqlens=None, interpret=FAST, form="auto", segment_ids=None):
  def ker(q, k, v, g, h0, beta):
    return delta_rule_chunk_impl(q, k, v, beta, g, scale=None, initial_state=h0,
                                 output_final_state=True, cu_seqlens=cu_seqlens, chunk_size=C,
                                 interpret=interpret, backend=backend, form=form,
                                 segment_ids=segment_ids)

  def ref(q, k, v, g, h0, beta):
    return R.delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True,
                        cu_seqlens=cu_seqlens, segment_ids=segment_ids)
  return ker, ref


# ------------------------------------------------------------------------------ GLA family

@pytest.mark.parametrize("kind", [pytest.param("none", marks=pytest.mark.slow),
                                  pytest.param("scalar", marks=pytest.mark.slow), "channel"])
def test_gla_fp32_odd_length_headdim60(kind):
  # V = 100 -> 128 padded: fp32 on the GPU structure runs the parallel kernels in 2 V tiles.
  args = _inputs(0, 2, 75, 2, 60, 100, jnp.float32, kind)
  _compare(*_gla_fns(16, "gpu"), args, F32_TOL, F32_TOL)


@pytest.mark.slow  # default: the TPU structure in test_tpu_several_chunks_per_step (NaN check)
@pytest.mark.parametrize("kind", ["scalar", "channel"])
def test_gla_tpu_structure_nan_check(kind):
  args = _inputs(1, 1, 50, 2, 60, 48, jnp.float32, kind)
  _compare(*_gla_fns(16, "tpu", interpret=NAN_CHECK), args, F32_TOL, F32_TOL)


def test_gla_bf16_headdim128():
  args = _inputs(2, 1, 63, 2, 128, 128, jnp.bfloat16, "channel")
  _compare(*_gla_fns(32, "gpu", interpret=NAN_CHECK), args, BF16_TOL, BF16_TOL)


@pytest.mark.parametrize("kind", [pytest.param("scalar", marks=pytest.mark.slow), "channel"])
def test_gla_strong_gates(kind):
  args = _inputs(3, 1, 40, 2, 32, 32, jnp.float32, kind, strength="strong")
  _compare(*_gla_fns(16, "gpu"), args, F32_TOL, F32_TOL, dg_tol=STRONG_DG_TOL)


@pytest.mark.slow   # the default run has varlen through ops (test_ops_*::test_varlen_tail_traced)
def test_gla_varlen_with_empty_sequence():
  cu = np.array([0, 20, 20, 57, 70], np.int32)
  args = _inputs(4, 1, 70, 2, 32, 16, jnp.float32, "channel", n_states=4)
  _compare(*_gla_fns(16, "gpu", cu_seqlens=cu), args, F32_TOL, F32_TOL)


def test_gla_split_and_resume():
  a = _inputs(5, 2, 90, 2, 32, 32, jnp.float32, "scalar")
  kw = dict(scale=None, cu_seqlens=None, chunk_size=16, interpret=FAST, backend="gpu")
  o, s = gla_chunk_impl(a["q"], a["k"], a["v"], a["g"], initial_state=a["h0"],
                        output_final_state=True, **kw)
  cut = 37
  sl = lambda x, i, j: x[:, i:j]
  o1, s1 = gla_chunk_impl(sl(a["q"], 0, cut), sl(a["k"], 0, cut), sl(a["v"], 0, cut),
                          sl(a["g"], 0, cut), initial_state=a["h0"], output_final_state=True,
                          **kw)
  o2, s2 = gla_chunk_impl(sl(a["q"], cut, 90), sl(a["k"], cut, 90), sl(a["v"], cut, 90),
                          sl(a["g"], cut, 90), initial_state=s1, output_final_state=True, **kw)
  assert rel_err(o, jnp.concatenate([o1, o2], 1)) < 1e-5
  assert rel_err(s, s2) < 1e-5


def test_public_entry_points_default_interpret_and_no_state():
  a = _inputs(6, 1, 20, 2, 16, 16, jnp.float32, "scalar", beta=True, normalize_k=True)
  o, s = pallas_kernels.gla_chunk(a["q"], a["k"], a["v"], a["g"], chunk_size=16, interpret=True)
  assert s is None
  assert rel_err(R.gla(a["q"], a["k"], a["v"], a["g"])[0], o) < F32_TOL
  # On a CPU backend without interpret=True the kernels still run (the plain interpreter).
  o, s = pallas_kernels.delta_rule_chunk(a["q"], a["k"], a["v"], a["beta"], a["g"],
                                         chunk_size=16, output_final_state=True)
  ro, rs = R.delta_rule(a["q"], a["k"], a["v"], a["beta"], a["g"], output_final_state=True)
  assert rel_err(ro, o) < F32_TOL and rel_err(rs, s) < F32_TOL


# ------------------------------------------------------------------------------ delta rule

@pytest.mark.parametrize("gated", [pytest.param(False, marks=pytest.mark.slow), True])
def test_delta_fp32_odd_length_headdim60(gated):
  args = _inputs(7, 2, 45, 2, 60, 32, jnp.float32, "scalar" if gated else "none", beta=True,
                 normalize_k=True)
  _compare(*_delta_fns(16, "gpu"), args, F32_TOL, F32_TOL)


@pytest.mark.slow  # default: delta on the TPU structure in test_segment_ids, test_forward_forms
def test_delta_bf16_tpu_structure():
  args = _inputs(8, 1, 40, 2, 128, 64, jnp.bfloat16, "scalar", beta=True, normalize_k=True)
  _compare(*_delta_fns(16, "tpu", interpret=NAN_CHECK), args, BF16_TOL, BF16_TOL)


@pytest.mark.slow
def test_delta_varlen_with_empty_sequence():
  cu = np.array([0, 0, 25, 41], np.int32)
  args = _inputs(9, 1, 41, 2, 32, 16, jnp.float32, "scalar", beta=True, normalize_k=True,
                 n_states=3)
  _compare(*_delta_fns(16, "gpu", cu_seqlens=cu), args, F32_TOL, F32_TOL)


# --------------------------------------------------------------------- packed rows (segments)

def _segment_fns(op, backend, seg, interpret=FAST, C=16):
  def ker(q, k, v, g, h0, beta=None):
    kw = dict(scale=None, initial_state=h0, output_final_state=True, cu_seqlens=None,
              chunk_size=C, interpret=interpret, backend=backend, segment_ids=seg)
    if op == "gla":
      return gla_chunk_impl(q, k, v, g, **kw)
    return delta_rule_chunk_impl(q, k, v, beta, g, **kw)

  def ref(q, k, v, g, h0, beta=None):
    kw = dict(initial_state=h0, output_final_state=True, segment_ids=seg)
    return R.gla(q, k, v, g, **kw) if op == "gla" else R.delta_rule(q, k, v, beta, g, **kw)
  return ker, ref


@pytest.mark.parametrize("op,kind,backend", [
    ("gla", "channel", "gpu"), ("delta", "scalar", "tpu"),
    pytest.param("gla", "none", "tpu", marks=pytest.mark.slow),
    pytest.param("gla", "scalar", "gpu", marks=pytest.mark.slow),
    pytest.param("gla", "channel", "tpu", marks=pytest.mark.slow),
    pytest.param("delta", "none", "gpu", marks=pytest.mark.slow)])
def test_segment_ids(op, kind, backend):
  """Packed [B, T] rows (boundaries inside and on chunk edges, a returning id, padding, a
  row without boundaries) vs the token-by-token reference: values and every gradient."""
  from tests.ops_util import packed_segment_ids
  B, T = 3, 70
  seg = packed_segment_ids(B, T)
  args = _inputs(12, B, T, 2, 32, 16, jnp.float32, kind, beta=op == "delta",
                 normalize_k=op == "delta")
  interpret = NAN_CHECK if backend == "tpu" else FAST
  _compare(*_segment_fns(op, backend, seg, interpret), args, F32_TOL, F32_TOL)


# ---------------------------------------------------------------- forms, tiles, grid steps

@pytest.mark.parametrize("op,kind,backend,form", [
    ("gla", "channel", "gpu", "fused"), ("delta", "scalar", "tpu", "two_pass"),
    pytest.param("gla", "scalar", "tpu", "two_pass", marks=pytest.mark.slow),
    pytest.param("delta", "none", "gpu", "fused", marks=pytest.mark.slow)])
def test_forward_forms(op, kind, backend, form):
  """The two forward forms the small default tests do not pick (GPU fused, TPU two-pass)."""
  delta = op == "delta"
  args = _inputs(13, 2, 50, 2, 32, 32, jnp.float32, kind, beta=delta, normalize_k=delta)
  fns = (_delta_fns if delta else _gla_fns)(16, backend, form=form)
  _compare(*fns, args, F32_TOL, F32_TOL)


def test_forms_agree_in_bf16():
  """Fused and two-pass forward of one bf16 call: the same math, close in value (the two-pass
  form rounds the chunk states to bf16 between its passes)."""
  a = _inputs(14, 1, 70, 2, 32, 32, jnp.bfloat16, "scalar")
  run = lambda form: gla_chunk_impl(a["q"], a["k"], a["v"], a["g"], scale=None,
                                    initial_state=a["h0"], output_final_state=True,
                                    cu_seqlens=None, chunk_size=16, interpret=FAST,
                                    backend="gpu", form=form)
  (o1, s1), (o2, s2) = run("fused"), run("two_pass")
  ref = R.gla(*(a[n].astype(jnp.float32) for n in "qkv"), a["g"], initial_state=a["h0"])[0]
  assert rel_err(ref, o1) < 5e-3 and rel_err(ref, o2) < 5e-3
  assert rel_err(s1, s2) < 1e-6                     # the state pass is fp32 in both


def test_tpu_several_chunks_per_step():
  """G = 4 chunks per TPU grid step (a loop inside the step, the state carried in VMEM
  across steps), packed rows, T padded to a multiple of G chunks (100 -> 8 chunks of 16):
  values and every gradient, NaN-filled uninitialised memory."""
  from tests.ops_util import packed_segment_ids
  seg = packed_segment_ids(2, 100)
  args = _inputs(15, 2, 100, 1, 32, 16, jnp.float32, "channel")
  with tiling.override(G=4):
    _compare(*_gla_fns(16, "tpu", interpret=NAN_CHECK, segment_ids=seg), args, F32_TOL,
             F32_TOL)


def test_tpu_varlen_several_chunks_per_step():
  """Varlen on the TPU structure (the chunk flags in SMEM, all N states of a head in VMEM)
  with G = 2 chunks per step, an empty sequence, a sequence starting mid-step."""
  cu = np.array([0, 0, 21, 40, 50], np.int32)
  args = _inputs(16, 1, 50, 1, 32, 16, jnp.float32, "scalar", n_states=4)
  with tiling.override(G=2):
    _compare(*_gla_fns(16, "tpu", cu_seqlens=cu, interpret=NAN_CHECK), args, F32_TOL,
             F32_TOL)


def test_gpu_k_and_v_tiles():
  """The GPU state passes in 2 x 2 (K, V) tiles, the output and grads kernels in 2 V tiles."""
  T16 = tiling.Tiles(BK=16, BV=16)
  tiles = {(n, "float32"): T16 for n in ("state", "output", "grads")}
  args = _inputs(17, 1, 40, 2, 32, 32, jnp.float32, "scalar")
  with tiling.override(tiles=tiles, fused=False):
    _compare(*_gla_fns(16, "gpu"), args, F32_TOL, F32_TOL)


def test_tiling_rules():
  """The shape rules of tiling.py, by hand: the GPU state pass fills 128 programs at B=2,
  H=16, D=128 (2 x 2 tiles of 64: 128 programs, not the 64 of V tiles alone), the fused
  forward is picked there and not for a single head, and a TPU kernel at T = 32k takes 16
  chunks per grid step (2 * 16 * 512 / 16 = 1024 steps)."""
  t = tiling.seq_tiles("state", "gpu", jnp.bfloat16, 2, 16, 128, 128)
  assert (t.BK, t.BV) == (64, 64) and 2 * 16 * (128 // t.BK) * (128 // t.BV) == 128
  t = tiling.seq_tiles("delta_state", "gpu", jnp.bfloat16, 2, 16, 128, 128)
  assert (t.BK, t.BV) == (128, 32)
  assert tiling.use_fused("gpu", 2, 16, 128, 512, jnp.bfloat16)
  assert not tiling.use_fused("gpu", 1, 1, 128, 512, jnp.bfloat16)
  assert tiling.use_fused("tpu", 1, 1, 128, 512, jnp.bfloat16)
  assert tiling.chunks_per_step("tpu", 2, 16, 32768 // 64) == 16
  assert tiling.chunks_per_step("tpu", 1, 1, 3) == 1 and tiling.chunks_per_step("gpu", 2, 16, 512) == 1


# ------------------------------------------------------------------ bf16 accuracy (fla's tols)

def _accuracy():
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "accuracy.py")
  return load_module(path, "linjax_bench_accuracy")


@pytest.mark.parametrize("kernel,strength", [
    ("linear", "weak"), ("simple_gla", "strong"), ("gla", "strong"), ("delta", "weak"),
    ("gated_delta", "strong")])
def test_bf16_accuracy_small(kernel, strength):
  """bf16 inputs, every output and gradient of the kernel within fla's tolerances of the fp32
  reference (o, dq, dk, dv, dh0 5e-3; dg, dbeta 1e-2), and the jnp chunk method on the same
  inputs as the comparison row (benchmarks/accuracy.py at a small shape)."""
  acc = _accuracy()
  res = acc.errors(kernel, 48, 32, strength, C=16)
  assert not acc.within(res["pallas"]), res
  assert not acc.within(res["chunk"]), res


@pytest.mark.slow
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("kernel,strength", [
    ("linear", "weak"), ("simple_gla", "weak"), ("simple_gla", "strong"), ("gla", "weak"),
    ("gla", "strong"), ("delta", "weak"), ("gated_delta", "weak"), ("gated_delta", "strong")])
def test_bf16_accuracy_T4096(kernel, strength, K):
  acc = _accuracy()
  res = acc.errors(kernel, 4096, K, strength)
  assert not acc.within(res["pallas"]), res


# ------------------------------------------------------------------------------ slow matrix

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("kind", ["none", "scalar", "channel"])
@pytest.mark.parametrize("C", [16, 32, 64])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gla_matrix_slow(backend, kind, C, dtype):
  dt = jnp.dtype(dtype)
  args = _inputs(10, 2, 130, 2, 128 if dt == jnp.bfloat16 else 60, 64, dt, kind)
  tol = F32_TOL if dt == jnp.float32 else BF16_TOL
  _compare(*_gla_fns(C, backend), args, tol, tol)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("strength", ["normal", "strong"])
@pytest.mark.parametrize("C", [16, 64])
def test_delta_matrix_slow(backend, gated, strength, C):
  args = _inputs(11, 1, 100, 2, 60, 60, jnp.float32, "scalar" if gated else "none",
                 strength=strength, beta=True, normalize_k=True)
  _compare(*_delta_fns(C, backend), args, F32_TOL, F32_TOL, dg_tol=STRONG_DG_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "scalar", "channel"])
def test_gla_varlen_slow(kind):
  cu = np.array([0, 5, 5, 70, 71, 140], np.int32)
  args = _inputs(12, 1, 140, 2, 60, 32, jnp.float32, kind, n_states=5)
  _compare(*_gla_fns(32, "tpu", cu_seqlens=cu), args, F32_TOL, F32_TOL)
