"""The kernels compiled for a real GPU / TPU (no interpreter) vs reference.py, values and grads.

Run on an accelerator host: `JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_pallas_gpu.py`
(or `-m tpu` with JAX_PLATFORMS=tpu). The kernels run at the default (production) matmul
precision; only the fp32 reference is computed at "highest" (no TF32 / bf16 passes).
`benchmarks/gpu_run.py` runs the same comparisons (and more) as one timed script.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from linjax.ops import reference as R
from tests.test_pallas import BF16_TOL, F32_TOL, _compare, _inputs

_PLATFORM = jax.default_backend()
accel = pytest.mark.skipif(_PLATFORM not in ("gpu", "tpu"), reason="needs a GPU or TPU")
CASES = [("none", "float32", 64), ("scalar", "float32", 64), ("channel", "float32", 32),
         ("scalar", "bfloat16", 64), ("channel", "bfloat16", 64)]


def _highest(fn):
  def ref(*a, **kw):
    with jax.default_matmul_precision("highest"):
      return fn(*a, **kw)
  return ref


def _gla(C, form="auto", cu=None):
  ker = lambda q, k, v, g, h0: pallas_kernels.gla_chunk(
      q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=C, form=form,
      cu_seqlens=cu)
  ref = _highest(lambda q, k, v, g, h0: R.gla(q, k, v, g, initial_state=h0,
                                              output_final_state=True, cu_seqlens=cu))
  return ker, ref


def _delta(C, form="auto", cu=None):
  ker = lambda q, k, v, g, h0, beta: pallas_kernels.delta_rule_chunk(
      q, k, v, beta, g, initial_state=h0, output_final_state=True, chunk_size=C, form=form,
      cu_seqlens=cu)
  ref = _highest(lambda q, k, v, g, h0, beta: R.delta_rule(
      q, k, v, beta, g, initial_state=h0, output_final_state=True, cu_seqlens=cu))
  return ker, ref


@pytest.mark.gpu
@pytest.mark.tpu
@accel
@pytest.mark.parametrize("form", ["fused", "two_pass"])
@pytest.mark.parametrize("kind,dtype,C", CASES)
@pytest.mark.parametrize("K", [60, 128])
def test_gla_on_device(kind, dtype, C, K, form):
  dt = jnp.dtype(dtype)
  args = _inputs(0, 2, 333, 4, K, 128, dt, kind)
  tol = F32_TOL if dt == jnp.float32 else BF16_TOL
  print(kind, dtype, C, K, form, _compare(*_gla(C, form), args, tol, tol))


@pytest.mark.gpu
@pytest.mark.tpu
@accel
@pytest.mark.parametrize("form", ["fused", "two_pass"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_delta_on_device(gated, dtype, form):
  dt = jnp.dtype(dtype)
  args = _inputs(1, 2, 257, 4, 128, 128, dt, "scalar" if gated else "none", beta=True,
                 normalize_k=True)
  tol = F32_TOL if dt == jnp.float32 else BF16_TOL
  print(gated, dtype, form, _compare(*_delta(64, form), args, tol, tol))


@pytest.mark.gpu
@pytest.mark.tpu
@accel
@pytest.mark.parametrize("op", ["gla", "delta"])
def test_varlen_on_device(op):
  cu = np.array([0, 100, 100, 333, 400], np.int32)
  delta = op == "delta"
  args = _inputs(2, 1, 400, 4, 128, 128, jnp.bfloat16, "scalar", beta=delta,
                 normalize_k=delta, n_states=4)
  fns = _delta(64, cu=cu) if delta else _gla(64, cu=cu)
  print(op, _compare(*fns, args, BF16_TOL, BF16_TOL))


def test_gpu_run_dry_run(tmp_path):
  """benchmarks/gpu_run.py --dry-run (CPU, interpret mode, tiny shapes) runs every section of
  the prepared device script; every correctness case passes and no step errors, so the
  script that a device call runs cannot rot."""
  from tests.helpers import load_module
  import json
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  mod = load_module(os.path.join(root, "benchmarks", "gpu_run.py"), "linjax_gpu_run")
  mod.main(["--dry-run", "--out", str(tmp_path)])
  rows = [json.loads(l) for l in open(tmp_path / "gpu_run.jsonl")]
  assert {r["section"] for r in rows} == {"env", "A", "B", "C", "D"}
  bad = [(r["name"], r["status"]) for r in rows
         if r.get("status", "ok") not in ("ok", "PASS") and not r["status"].startswith("not run")]
  assert not bad, bad
  assert sum(r["section"] == "A" for r in rows) == 3
  md = open(tmp_path / "gpu_run.md").read()
  assert "## A. Correctness" in md and "## C. Timing" in md and "copy bandwidth" in md
