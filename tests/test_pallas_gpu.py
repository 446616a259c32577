"""The kernels compiled for a real GPU / TPU (no interpreter) vs reference.py, values and grads.

Run on an accelerator host: `JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_pallas_gpu.py`
(or `-m tpu` with JAX_PLATFORMS=tpu).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from linjax.ops import reference as R
from tests.test_pallas import BF16_TOL, F32_TOL, _compare, _inputs

_PLATFORM = jax.default_backend()
if _PLATFORM in ("gpu", "tpu"):  # the fp32 reference must not use TF32 / bf16 passes
  jax.config.update("jax_default_matmul_precision", "highest")
accel = pytest.mark.skipif(_PLATFORM not in ("gpu", "tpu"), reason="needs a GPU or TPU")
CASES = [("none", "float32", 64), ("scalar", "float32", 64), ("channel", "float32", 32),
         ("scalar", "bfloat16", 64), ("channel", "bfloat16", 64)]


def _gla(C):
  ker = lambda q, k, v, g, h0: pallas_kernels.gla_chunk(
      q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=C)
  ref = lambda q, k, v, g, h0: R.gla(q, k, v, g, initial_state=h0, output_final_state=True)
  return ker, ref


def _delta(C):
  ker = lambda q, k, v, g, h0, beta: pallas_kernels.delta_rule_chunk(
      q, k, v, beta, g, initial_state=h0, output_final_state=True, chunk_size=C)
  ref = lambda q, k, v, g, h0, beta: R.delta_rule(q, k, v, beta, g, initial_state=h0,
                                                  output_final_state=True)
  return ker, ref


@pytest.mark.gpu
@pytest.mark.tpu
@accel
@pytest.mark.parametrize("kind,dtype,C", CASES)
@pytest.mark.parametrize("K", [60, 128])
def test_gla_on_device(kind, dtype, C, K):
  dt = jnp.dtype(dtype)
  args = _inputs(0, 2, 333, 4, K, 128, dt, kind)
  tol = F32_TOL if dt == jnp.float32 else BF16_TOL
  print(kind, dtype, C, K, _compare(*_gla(C), args, tol, tol))


@pytest.mark.gpu
@pytest.mark.tpu
@accel
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_delta_on_device(gated, dtype):
  dt = jnp.dtype(dtype)
  args = _inputs(1, 2, 257, 4, 128, 128, dt, "scalar" if gated else "none", beta=True,
                 normalize_k=True)
  tol = F32_TOL if dt == jnp.float32 else BF16_TOL
  print(gated, dtype, _compare(*_delta(64), args, tol, tol))
