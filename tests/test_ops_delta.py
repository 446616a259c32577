"""linjax.ops.delta_rule: every method against the token-by-token reference, values and
gradients (q, k, v, beta, g, initial state), DeltaNet and gated DeltaNet, beta up to 2."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import ops
from linjax.ops import reference
from tests.helpers import assert_rel, load_fla_naive, rel_err
from tests.ops_util import (BF16_TOL, F32, FP32_TOL, assert_per_row, case, compare,
                            make_inputs, check_segment_id_errors, check_segment_ids,
                            run_with_grads)

METHODS = ("recurrent", "parallel", "chunk", "assoc_scan")
GATES = (None, "head")


def check(method, B, T, H, K, V, gate, strength, chunk_size=64, dtype="float32", seed=0):
  inputs, (do, dS), ref = case("delta_rule", seed, B, T, H, K, V, gate, strength, dtype)
  fn = functools.partial(ops.delta_rule, method=method, chunk_size=chunk_size)
  out = run_with_grads(fn, inputs, do, dS)
  tol = FP32_TOL if dtype == "float32" else BF16_TOL
  return compare(ref, out, tol, ("delta_rule", method, dtype))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("method", METHODS)
def test_methods_match_reference(method, gate):
  check(method, 2, 75, 2, 60, 36, gate, "mixed", chunk_size=32)


MATRIX = [
    # method, T, K, chunk, gate, strength
    ("chunk", 1, 60, 16, "head", "weak"),
    ("assoc_scan", 1, 128, 64, None, "mixed"),
    ("chunk", 63, 128, 64, "head", "strong"),
    ("assoc_scan", 63, 60, 16, "head", "weak"),
    ("chunk", 500, 128, 64, "head", "mixed"),
    ("parallel", 500, 60, 64, "head", "weak"),
]


@pytest.mark.parametrize("method,T,K,chunk,gate,strength", MATRIX)
def test_matrix(method, T, K, chunk, gate, strength):
  check(method, 1, T, 2, K, 32, gate, strength, chunk_size=chunk)


@pytest.mark.slow
@pytest.mark.parametrize("method,T,K,chunk,gate,strength", [
    c for c in itertools.product(METHODS, (1, 63, 75, 500), (60, 128), (16, 32, 64), GATES,
                                 ("weak", "strong"))
    if c[0] in ("chunk", "assoc_scan") or c[3] == 64])
def test_matrix_full(method, T, K, chunk, gate, strength):
  check(method, 1, T, 2, K, 32, gate, strength, chunk_size=chunk)


@pytest.mark.parametrize("method,gate", [("chunk", "head")])
def test_bf16_inputs(method, gate):
  inputs, (do, dS), ref = case("delta_rule", 3, 1, 75, 2, 64, 32, gate, "mixed", "bfloat16")
  out = run_with_grads(functools.partial(ops.delta_rule, method=method, chunk_size=32),
                       inputs, do, dS)
  assert out[0].dtype == jnp.bfloat16 and out[1].dtype == F32
  compare(ref, out, BF16_TOL, ("delta_rule", method, "bfloat16"))


def test_long_bf16_strong_gates():
  """T = 32768, bf16 inputs, log decay down to -10 per step: finite, within 2e-2 of fp32 for
  the whole sequence, every token's output, every state row at T/2 and at the end."""
  T, H, K, V = 32768, 1, 16, 16
  inp = make_inputs(7, 1, T, H, K, V, gate="head", strength="strong", delta=True)
  ref = jax.jit(functools.partial(reference.delta_rule, output_final_state=True))
  ref_o, ref_S = ref(**inp)
  bf = {n: (x.astype(jnp.bfloat16) if n in ("q", "k", "v", "beta") else x)
        for n, x in inp.items()}
  run = jax.jit(functools.partial(ops.delta_rule, method="chunk", output_final_state=True))
  o, S = run(**bf)
  assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(S)).all()
  assert_rel(ref_o, o, BF16_TOL, "o vs fp32 ref")
  assert_rel(ref_S, S, BF16_TOL, "final state vs fp32 ref")
  # every token (a zeroed or shifted token fails) and every state row, at T/2 and at the end,
  # against the fp32 reference on the same rounded inputs
  bf32 = {n: (None if x is None else x.astype(F32)) for n, x in bf.items()}
  ref_o32, ref_S32 = ref(**bf32)
  assert_per_row(ref_o32, o, BF16_TOL, "per-token o vs fp32 ref (same rounded inputs)")
  assert_per_row(ref_S32, S, BF16_TOL, "final state rows vs fp32 ref")
  half = {n: (x if n == "initial_state" or x is None else x[:, :T // 2]) for n, x in bf.items()}
  _, S_mid = run(**half)
  _, ref_mid = ref(**{n: (None if x is None else x.astype(F32)) for n, x in half.items()})
  assert_per_row(ref_mid, S_mid, BF16_TOL, "state rows at T/2 vs fp32 ref")


@pytest.mark.parametrize("method", METHODS)
def test_varlen_with_empty_sequence(method):
  cu = jnp.array([0, 13, 13, 50, 75], jnp.int32)
  N, T, H, K, V = 4, 75, 2, 60, 36
  inp = make_inputs(11, 1, T, H, K, V, gate="head", strength="mixed", delta=True, h0=False)
  inp["initial_state"] = jax.random.normal(jax.random.PRNGKey(5), (N, H, K, V), F32)
  do = jax.random.normal(jax.random.PRNGKey(6), (1, T, H, V), F32)
  dS = jax.random.normal(jax.random.PRNGKey(7), (N, H, K, V), F32)
  if method != "chunk":   # values for every method, gradients through the chunk one
    f = lambda op: jax.jit(functools.partial(op, cu_seqlens=cu, output_final_state=True))
    ref = (*f(reference.delta_rule)(**inp), {})
    out = (*f(functools.partial(ops.delta_rule, method=method, chunk_size=16))(**inp), {})
  else:
    ref = run_with_grads(functools.partial(reference.delta_rule, cu_seqlens=cu), inp, do, dS)
    out = run_with_grads(functools.partial(ops.delta_rule, cu_seqlens=cu, method=method,
                                           chunk_size=16), inp, do, dS)
  compare(ref, out, FP32_TOL, ("delta_rule", method, "varlen"))
  np.testing.assert_array_equal(np.asarray(out[1][1]), np.asarray(inp["initial_state"][1]))


@pytest.mark.parametrize("method,gate", [
    ("recurrent", None), ("chunk", "head"), ("assoc_scan", "head"), ("parallel", None),
    ("pallas", "head")])
def test_varlen_tail_traced(method, gate):
  """cu_seqlens[-1] < T with an empty sequence, traced under jit (see test_ops_gla)."""
  from tests.test_ops_gla import check_varlen_tail
  check_varlen_tail("delta_rule", method, gate)


@pytest.mark.parametrize("method,gate", [("chunk", "head"), ("parallel", None)])
def test_split_and_resume(method, gate):
  inp = make_inputs(13, 2, 75, 2, 60, 36, gate=gate, strength="mixed", delta=True)
  f = jax.jit(functools.partial(ops.delta_rule, method=method, chunk_size=16,
                                output_final_state=True))
  o, S = f(**inp)
  cut = 41
  part = lambda sl: {n: (None if inp[n] is None else inp[n][:, sl])
                     for n in ("q", "k", "v", "beta", "g")}
  o1, S1 = f(**part(slice(0, cut)), initial_state=inp["initial_state"])
  o2, S2 = f(**part(slice(cut, None)), initial_state=S1)
  assert rel_err(o, jnp.concatenate([o1, o2], 1)) < FP32_TOL
  assert rel_err(S, S2) < FP32_TOL


@pytest.mark.parametrize("gate", GATES)
def test_step_matches_full_op(gate):
  T = 9
  inp = make_inputs(17, 2, T, 2, 12, 8, gate=gate, delta=True)
  o, S = jax.jit(functools.partial(ops.delta_rule, output_final_state=True, method="chunk",
                                   chunk_size=16))(**inp)
  step = jax.jit(ops.delta_rule_step)
  state, outs = inp["initial_state"], []
  for t in range(T):
    g = None if inp["g"] is None else inp["g"][:, t]
    ot, state = step(state, inp["q"][:, t], inp["k"][:, t], inp["v"][:, t], inp["beta"][:, t], g)
    outs.append(ot)
  assert rel_err(o, jnp.stack(outs, 1)) < FP32_TOL
  assert rel_err(S, state) < FP32_TOL
  g = None if inp["g"] is None else inp["g"][:, :1]
  o1, _ = ops.delta_rule_step(inp["initial_state"], inp["q"][:, :1], inp["k"][:, :1],
                              inp["v"][:, :1], inp["beta"][:, :1], g)
  assert o1.shape == (2, 1, 2, 8) and rel_err(o[:, :1], o1) < FP32_TOL


def test_fla_naive_delta_rule_and_gated():
  torch = pytest.importorskip("torch")
  fla_delta, fla_gated = load_fla_naive("delta_rule"), load_fla_naive("gated_delta_rule")
  if fla_delta is None or fla_gated is None:
    pytest.skip("fla-core is not installed")
  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  bhtd = lambda x: t(x).transpose(1, 2)            # delta_rule_recurrence takes [B, H, T, D]
  inp = make_inputs(23, 2, 63, 2, 60, 36, delta=True)
  o_ref, S_ref = fla_delta.delta_rule_recurrence(
      bhtd(inp["q"]), bhtd(inp["k"]), bhtd(inp["v"]), t(inp["beta"]).transpose(1, 2),
      initial_state=t(inp["initial_state"]), output_final_state=True)
  o_ref = o_ref.transpose(1, 2).numpy()
  o, S = jax.jit(functools.partial(ops.delta_rule, output_final_state=True, chunk_size=16))(**inp)
  assert rel_err(o_ref, o) < FP32_TOL and rel_err(S_ref.numpy(), S) < FP32_TOL
  inp = make_inputs(29, 2, 63, 2, 60, 36, gate="head", strength="mixed", delta=True)
  o_ref, S_ref = fla_gated.naive_recurrent_gated_delta_rule(
      t(inp["q"]), t(inp["k"]), t(inp["v"]), t(inp["beta"]), t(inp["g"]), scale=0.3,
      initial_state=t(inp["initial_state"]), output_final_state=True)
  o, S = jax.jit(functools.partial(ops.delta_rule, scale=0.3, output_final_state=True,
                                   method="assoc_scan", chunk_size=32))(**inp)
  assert rel_err(o_ref.numpy(), o) < FP32_TOL and rel_err(S_ref.numpy(), S) < FP32_TOL


def test_auto_and_pallas_dispatch(monkeypatch):
  """method="pallas" calls the Pallas kernel (interpret mode on CPU, the chunk size passed
  through) and returns what the kernel computes, which matches the jnp chunk method."""
  inp = make_inputs(31, 1, 20, 1, 8, 8, gate="head", delta=True, h0=False)
  o_auto, _ = ops.delta_rule(**inp)
  o_chunk, _ = ops.delta_rule(**inp, method="chunk")
  np.testing.assert_array_equal(np.asarray(o_auto), np.asarray(o_chunk))
  import pallas_kernels
  real, seen = pallas_kernels.delta_rule_chunk, {}
  def spy(q, k, v, beta, g, **kw):
    seen.update(kw)
    return real(q, k, v, beta, g, **kw)
  monkeypatch.setattr(pallas_kernels, "delta_rule_chunk", spy)
  o_p, _ = ops.delta_rule(**inp, method="pallas", chunk_size=16)
  assert seen["interpret"] is True and seen["chunk_size"] == 16 and seen["cu_seqlens"] is None
  assert rel_err(o_chunk, o_p) < FP32_TOL
  monkeypatch.delattr(pallas_kernels, "delta_rule_chunk")
  with pytest.raises(NotImplementedError, match="delta_rule_chunk"):
    ops.delta_rule(**inp, method="pallas")


@pytest.mark.parametrize("bad,match", [
    (dict(beta=jnp.zeros((2, 5, 4))), r"`beta` must have shape \[B, T, H\]"),
    (dict(beta=jnp.zeros((2, 5, 3), jnp.int32)), r"`beta` must be a floating"),
    (dict(g=jnp.zeros((2, 5, 3, 8))), r"`g` for delta_rule must have shape \[B, T, H\]"),
    (dict(k=jnp.zeros((2, 5, 3, 7))), r"`k` must have shape \[B, T, H, K\]"),
    (dict(initial_state=jnp.zeros((2, 3, 4, 8))), r"`initial_state` must have shape"),
])
def test_errors_name_the_argument(bad, match):
  args = dict(q=jnp.zeros((2, 5, 3, 8)), k=jnp.zeros((2, 5, 3, 8)), v=jnp.zeros((2, 5, 3, 4)),
              beta=jnp.zeros((2, 5, 3)))
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    ops.delta_rule(**args)


@pytest.mark.parametrize("gate,method", [
    ("head", "chunk"), pytest.param(None, "assoc_scan", marks=pytest.mark.slow),
    pytest.param("head", "parallel", marks=pytest.mark.slow),
    pytest.param(None, "recurrent", marks=pytest.mark.slow),
    pytest.param("head", "pallas", marks=pytest.mark.slow)])
def test_segment_ids_reset_per_document(gate, method):
  """Packed [B, T] rows vs the token-by-token reference (state zeroed wherever the id
  changes): values, final state, every gradient; one document == a separate call."""
  check_segment_ids("delta_rule", gate, method)


def test_segment_ids_errors():
  check_segment_id_errors("delta_rule")
