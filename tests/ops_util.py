"""Helpers for the ops tests (tests/test_ops_*.py): inputs, gradients, comparisons."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import rel_err

F32 = jnp.float32
FP32_TOL = 1e-5
BF16_TOL = 2e-2

# Largest relative error seen per (op, method, what), filled as the tests run; printed at the
# end of the session by `report_errors` (see test_ops_misc.py).
MAX_ERR: dict = {}


def gate_values(key, shape, strength):
  """Log forget gates <= 0. weak: near 0; strong: down to -10 per step; mixed: log-uniform."""
  if strength == "weak":
    return -jax.random.uniform(key, shape, F32, 0.0, 1e-2)
  if strength == "strong":
    return -jax.random.uniform(key, shape, F32, 0.0, 10.0)
  if strength == "mixed":
    return -jnp.exp(jax.random.uniform(key, shape, F32, np.log(1e-3), np.log(10.0)))
  raise ValueError(strength)


def make_inputs(seed, B, T, H, K, V, *, gate=None, strength="mixed", delta=False,
                h0=True, dtype=F32):
  """dict of op inputs. gate: None | 'head' | 'channel'. delta: add beta in (0, 2) and use
  L2-normalised keys (DeltaNet)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (B, T, H, K), F32)
  k = jax.random.normal(ks[1], (B, T, H, K), F32)
  if delta:
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  else:
    k = k * K ** -0.5
  v = jax.random.normal(ks[2], (B, T, H, V), F32)
  out = dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype))
  if delta:
    out["beta"] = (2.0 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H), F32))).astype(dtype)
  if gate == "head":
    out["g"] = gate_values(ks[4], (B, T, H), strength)
  elif gate == "channel":
    out["g"] = gate_values(ks[4], (B, T, H, K), strength)
  else:
    out["g"] = None
  if h0:
    out["initial_state"] = jax.random.normal(ks[5], (B, H, K, V), F32)
  return out


def cotangents(seed, o_shape, s_shape):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1000))
  return jax.random.normal(k1, o_shape, F32), jax.random.normal(k2, s_shape, F32)


def run_with_grads(fn, inputs, do, dS, **kw):
  """(o, S, grads) of `(o * do).sum() + (S * dS).sum()` wrt every non-None float input."""
  names = sorted(n for n, x in inputs.items() if x is not None)
  fixed = {n: x for n, x in inputs.items() if x is None}

  @jax.jit
  def go(diff):
    def loss(diff):
      o, S = fn(**diff, **fixed, output_final_state=True, **kw)
      return (o.astype(F32) * do).sum() + (S * dS).sum(), (o, S)
    (_, (o, S)), grads = jax.value_and_grad(loss, has_aux=True)(diff)
    return o, S, grads

  return go({n: inputs[n] for n in names})


def assert_per_row(ref, out, tol, what, floor=None):
  """Every row (the last axis: one token's output per head, one row of a state) within `tol`
  of its own norm, plus `floor` (default: tol) times the rms row norm: a zeroed, shifted or
  swapped token fails even when the global relative error of a long sequence hides it."""
  ref = np.asarray(ref, np.float64)
  out = np.asarray(out, np.float64)
  assert ref.shape == out.shape, (what, ref.shape, out.shape)
  assert np.isfinite(out).all(), f"{what}: non-finite values"
  rn = np.linalg.norm(ref, axis=-1)
  err = np.linalg.norm(ref - out, axis=-1)
  allowed = tol * rn + (tol if floor is None else floor) * np.sqrt(np.mean(rn ** 2))
  bad = err > allowed
  if bad.any():
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} rows off, first at index "
                         f"{idx}: error {err[idx]:.3e} > allowed {allowed[idx]:.3e} (row norm "
                         f"{rn[idx]:.3e})")


def compare(ref, out, tol, tag):
  """ref/out: (o, S, grads). Asserts every relative error <= tol; records the maxima."""
  errs = {"o": rel_err(ref[0], out[0]), "S": rel_err(ref[1], out[1])}
  for n in ref[2]:
    errs["d" + n] = rel_err(ref[2][n], out[2][n])
  for what, e in errs.items():
    key = tag + (what,)
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), e)
  if os.environ.get("LINJAX_OPS_ERRORS"):   # JSON lines of every comparison, for reports
    with open(os.environ["LINJAX_OPS_ERRORS"], "a") as f:
      f.write(json.dumps({"tag": list(tag), "errs": errs}) + "\n")
  bad = {w: e for w, e in errs.items() if not e <= tol}
  assert not bad, f"{tag}: relative errors above {tol:g}: " + ", ".join(
      f"{w}={e:.2e}" for w, e in bad.items())
  return errs


@functools.cache
def _ref_fn(op):
  from linjax.ops import reference
  return getattr(reference, op)


def reference_run(op, inputs, do, dS):
  """The fp32 reference on fp32 copies of the inputs."""
  f32 = {n: (None if x is None else x.astype(F32)) for n, x in inputs.items()}
  return run_with_grads(_ref_fn(op), f32, do, dS)


@functools.cache
def case(op, seed, B, T, H, K, V, gate, strength, dtype_name="float32", h0=True):
  """Cached (inputs, cotangents, fp32 reference (o, S, grads)) for one configuration."""
  dtype = jnp.dtype(dtype_name)
  inputs = make_inputs(seed, B, T, H, K, V, gate=gate, strength=strength,
                       delta=(op == "delta_rule"), h0=h0, dtype=dtype)
  do, dS = cotangents(seed, (B, T, H, V), (B, H, K, V))
  return inputs, (do, dS), reference_run(op, inputs, do, dS)


def packed_segment_ids(B, T):
  """[B, T] segment ids of packed rows: boundaries inside and on chunk edges (16, 32), a
  segment spanning several chunks, an id that returns after another (3, 4, 3), a one-token
  segment, trailing padding (id 0) and a row with no boundary."""
  seg = np.zeros((B, T), np.int32)
  cuts = [[0, 5, 16, 50, 51, T - 6], [0, 32, 40, T], [0, T]]
  ids = [[1, 2, 3, 4, 5, 0], [3, 4, 3], [7]]
  for b in range(B):
    c, i = cuts[b % 3], ids[b % 3]
    for s, e, v in zip(c[:-1], c[1:], i):
      seg[b, s:e] = v
  return jnp.asarray(seg)


def check_segment_ids(op, gate, method, B=3, T=70, H=2, K=16, V=8):
  """`linjax.ops.<op>(segment_ids=...)` vs `reference.<op>` (values, final state, all
  gradients; initial_state feeds each row's first segment), then one document of a packed
  row (row 0, tokens 16..49) equals a separate call from a zero state."""
  from linjax import ops
  from linjax.ops import reference
  inp = make_inputs(21, B, T, H, K, V, gate=gate, strength="mixed", delta=(op == "delta_rule"))
  seg = packed_segment_ids(B, T)
  do, dS = cotangents(21, (B, T, H, V), (B, H, K, V))
  ref = run_with_grads(functools.partial(getattr(reference, op), segment_ids=seg), inp, do, dS)
  out = run_with_grads(functools.partial(getattr(ops, op), segment_ids=seg, method=method,
                                         chunk_size=16), inp, do, dS)
  compare(ref, out, FP32_TOL, (op.split("_")[0], method, "segment_ids"))
  sub = {n: (None if inp[n] is None or n == "initial_state" else inp[n][:1, 16:50])
         for n in inp}
  o, _ = jax.jit(functools.partial(getattr(ops, op), method=method, chunk_size=16))(**sub)
  assert rel_err(o, out[0][:1, 16:50]) < FP32_TOL


def check_segment_id_errors(op):
  import pytest
  from linjax import ops
  fn = getattr(ops, op)
  inp = make_inputs(3, 2, 20, 2, 8, 8, delta=(op == "delta_rule"))
  seg = jnp.zeros((2, 20), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids.*shape"):
    fn(**inp, segment_ids=seg[:, :5])
  with pytest.raises(ValueError, match="integer"):
    fn(**inp, segment_ids=seg.astype(F32))
  one = {n: (x if x is None else x[:1]) for n, x in inp.items()}
  with pytest.raises(ValueError, match="not both"):
    fn(**one, segment_ids=seg[:1], cu_seqlens=jnp.array([0, 20]))
