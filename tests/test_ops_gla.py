"""linjax.ops.gla: every method against the token-by-token reference, values and gradients."""
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
GATES = (None, "head", "channel")


def check(method, B, T, H, K, V, gate, strength, chunk_size=64, dtype="float32", seed=0):
  inputs, (do, dS), ref = case("gla", seed, B, T, H, K, V, gate, strength, dtype)
  fn = functools.partial(ops.gla, method=method, chunk_size=chunk_size)
  out = run_with_grads(fn, inputs, do, dS)
  tol = FP32_TOL if dtype == "float32" else BF16_TOL
  return compare(ref, out, tol, ("gla", method, dtype))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("method", METHODS)
def test_methods_match_reference(method, gate):
  # odd length, head dim that is not a power of two, V != K, chunk 32, initial state
  check(method, 2, 75, 2, 60, 36, gate, "mixed", chunk_size=32)


# The matrix, a spread of it in the default run (the full product is `slow`).
MATRIX = [
    # method, T, K, chunk, gate, strength
    ("chunk", 1, 60, 16, "channel", "weak"),
    ("assoc_scan", 1, 128, 64, "head", "strong"),
    ("chunk", 63, 128, 64, "channel", "strong"),
    ("assoc_scan", 63, 60, 16, "channel", "weak"),
    ("chunk", 500, 128, 64, "channel", "mixed"),
    ("chunk", 500, 60, 32, "head", "strong"),
    ("parallel", 500, 60, 64, "channel", "mixed"),
    ("parallel", 63, 128, 64, "head", "weak"),
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


@pytest.mark.parametrize("method,gate", [("chunk", "channel"), ("parallel", "head")])
def test_bf16_inputs(method, gate):
  inputs, (do, dS), ref = case("gla", 3, 1, 75, 2, 64, 32, gate, "mixed", "bfloat16")
  out = run_with_grads(functools.partial(ops.gla, method=method, chunk_size=32), inputs, do, dS)
  assert out[0].dtype == jnp.bfloat16 and out[1].dtype == F32
  compare(ref, out, BF16_TOL, ("gla", method, "bfloat16"))


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_long_bf16_strong_gates(gate):
  """T = 32768, bf16, log gates down to -10 per step: finite and within 2e-2 of fp32, for the
  whole sequence, every token's output (a zeroed or shifted token fails), every row of the
  state at the middle and at the end."""
  T, H, K, V = 32768, 1, 16, 16
  inp = make_inputs(7, 1, T, H, K, V, gate=gate, strength="strong")
  ref_o, ref_S = jax.jit(functools.partial(reference.gla, output_final_state=True))(**inp)
  bf = {n: (x.astype(jnp.bfloat16) if n in "qkv" else x) for n, x in inp.items()}
  run = jax.jit(functools.partial(ops.gla, method="chunk", output_final_state=True))
  o, S = run(**bf)
  assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(S)).all()
  bf32 = {n: (None if x is None else x.astype(F32)) for n, x in bf.items()}
  ref_o32, ref_S32 = jax.jit(functools.partial(reference.gla, output_final_state=True))(**bf32)
  assert_rel(ref_o32, o, BF16_TOL, "o vs fp32 ref (same rounded inputs)")
  assert_rel(ref_o, o, BF16_TOL, "o vs fp32 ref")
  assert_rel(ref_S, S, BF16_TOL, "final state vs fp32 ref")
  assert_per_row(ref_o32, o, BF16_TOL, "per-token o vs fp32 ref (same rounded inputs)")
  assert_per_row(ref_S32, S, BF16_TOL, "final state rows vs fp32 ref")
  half = {n: (x if n == "initial_state" or x is None else x[:, :T // 2]) for n, x in bf.items()}
  _, S_mid = run(**half)
  _, ref_mid = jax.jit(functools.partial(reference.gla, output_final_state=True))(
      **{n: (None if x is None else x.astype(F32)) for n, x in half.items()})
  assert_per_row(ref_mid, S_mid, BF16_TOL, "state rows at T/2 vs fp32 ref")


@pytest.mark.parametrize("method", METHODS)
def test_varlen_with_empty_sequence(method):
  cu = jnp.array([0, 13, 13, 50, 75], jnp.int32)       # sequence 1 is empty
  N, T, H, K, V = 4, 75, 2, 60, 36
  inp = make_inputs(11, 1, T, H, K, V, gate="channel", strength="mixed", h0=False)
  inp["initial_state"] = jax.random.normal(jax.random.PRNGKey(5), (N, H, K, V), F32)
  do = jax.random.normal(jax.random.PRNGKey(6), (1, T, H, V), F32)
  dS = jax.random.normal(jax.random.PRNGKey(7), (N, H, K, V), F32)
  if method != "chunk":   # values for every method, gradients through the chunk one
    f = lambda op: jax.jit(functools.partial(op, cu_seqlens=cu, output_final_state=True))
    ref = (*f(reference.gla)(**inp), {})
    out = (*f(functools.partial(ops.gla, method=method, chunk_size=16))(**inp), {})
  else:
    ref = run_with_grads(functools.partial(reference.gla, cu_seqlens=cu), inp, do, dS)
    out = run_with_grads(functools.partial(ops.gla, cu_seqlens=cu, method=method, chunk_size=16),
                         inp, do, dS)
  compare(ref, out, FP32_TOL, ("gla", method, "varlen"))
  # the empty sequence keeps its initial state
  np.testing.assert_array_equal(np.asarray(out[1][1]), np.asarray(inp["initial_state"][1]))
  if method != "chunk":
    return
  # and a sequence equals a separate call
  for n in (2,):
    s, e = int(cu[n]), int(cu[n + 1])
    sub = {x: (None if inp[x] is None else inp[x][:, s:e]) for x in ("q", "k", "v", "g")}
    o, S = jax.jit(functools.partial(ops.gla, output_final_state=True, method=method,
                                     chunk_size=16))(**sub, initial_state=inp["initial_state"][n:n + 1])
    assert rel_err(o, out[0][:, s:e]) < FP32_TOL and rel_err(S[0], out[1][n]) < FP32_TOL


def check_varlen_tail(op, method, gate):
  """cu_seqlens with an empty sequence and cu_seqlens[-1] < T, traced under jit (so no
  method can read the lengths at trace time): the tokens of every sequence, each final state
  (the empty one keeps its initial state) and every gradient vs the token-by-token
  reference; the tokens after cu_seqlens[-1] are zeros."""
  cu = jnp.array([0, 9, 9, 30, 41], jnp.int32)
  N, T, H, K, V = 4, 47, 2, 8, 8
  inp = make_inputs(41, 1, T, H, K, V, gate=gate, strength="mixed", delta=(op == "delta_rule"),
                    h0=False)
  inp["initial_state"] = jax.random.normal(jax.random.PRNGKey(42), (N, H, K, V), F32)
  live = np.arange(T) < int(cu[-1])
  do = jnp.where(live[None, :, None, None], jax.random.normal(jax.random.PRNGKey(43),
                                                             (1, T, H, V), F32), 0.0)
  dS = jax.random.normal(jax.random.PRNGKey(44), (N, H, K, V), F32)
  ref = run_with_grads(functools.partial(getattr(reference, op), cu_seqlens=cu), inp, do, dS)
  fn = getattr(ops, op)

  @jax.jit
  def traced(cu_):
    return run_with_grads(lambda **kw: fn(**kw, cu_seqlens=cu_, method=method, chunk_size=16),
                          inp, do, dS)

  o, S, grads = traced(cu)
  o = np.asarray(o)
  np.testing.assert_array_equal(o[:, ~live], 0.0)
  live_ref = (np.asarray(ref[0])[:, live], ref[1], ref[2])
  compare(live_ref, (o[:, live], S, grads), FP32_TOL, (op.split("_")[0], method, "varlen_tail"))
  np.testing.assert_array_equal(np.asarray(S[1]), np.asarray(inp["initial_state"][1]))


@pytest.mark.parametrize("method,gate", [
    ("recurrent", "head"), ("chunk", "channel"), ("assoc_scan", None), ("parallel", "head"),
    ("pallas", "channel")])
def test_varlen_tail_traced(method, gate):
  check_varlen_tail("gla", method, gate)


def largest_array(fn, *args):
  """Elements of the largest array made by fn's jaxpr (outside Pallas kernels and loop
  bodies: the arrays a method materialises)."""
  def walk(jaxpr):
    best = 0
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
      if eqn.primitive.name in ("pjit", "closed_call", "custom_vjp_call", "custom_jvp_call"):
        for p in eqn.params.values():
          if hasattr(p, "jaxpr"):
            best = max(best, walk(p.jaxpr))
    return best
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("op,method", [("gla", "chunk"), ("delta_rule", "assoc_scan"),
                                       ("gla", "pallas"), ("delta_rule", "pallas")])
def test_varlen_traced_is_not_padded_per_sequence(op, method):
  """Traced cu_seqlens (lengths unknown at trace time) cost T + N C tokens, not N T: the
  largest array the op materialises is within 2x of the same op on one unpacked row."""
  N, T, H, K = 8, 512, 1, 16
  inp = make_inputs(3, 1, T, H, K, K, gate="head", delta=(op == "delta_rule"), h0=False)
  fn = getattr(ops, op)
  cu = jnp.array(np.linspace(0, T, N + 1).astype(np.int32))
  packed = largest_array(lambda cu_: fn(**inp, cu_seqlens=cu_, method=method, chunk_size=16,
                                        output_final_state=True)[0], cu)
  plain = largest_array(lambda: fn(**inp, method=method, chunk_size=16)[0])
  assert packed < 2 * plain, (packed, plain)


@pytest.mark.parametrize("method,gate", [("chunk", "channel"), ("assoc_scan", "head"),
                                         ("parallel", None)])
def test_split_and_resume(method, gate):
  inp = make_inputs(13, 2, 75, 2, 60, 36, gate=gate, strength="mixed")
  f = jax.jit(functools.partial(ops.gla, method=method, chunk_size=16, output_final_state=True))
  o, S = f(**inp)
  cut = 33
  part = lambda sl: {n: (None if inp[n] is None else inp[n][:, sl]) for n in ("q", "k", "v", "g")}
  o1, S1 = f(**part(slice(0, cut)), initial_state=inp["initial_state"])
  o2, S2 = f(**part(slice(cut, None)), initial_state=S1)
  assert rel_err(o, jnp.concatenate([o1, o2], 1)) < FP32_TOL
  assert rel_err(S, S2) < FP32_TOL


@pytest.mark.parametrize("gate,normalize", [(None, True), ("head", False), ("channel", True)])
def test_step_matches_full_op(gate, normalize):
  T = 9
  inp = make_inputs(17, 2, T, 2, 12, 8, gate=gate, h0=False)
  if normalize:
    inp["q"], inp["k"] = jax.nn.elu(inp["q"]) + 1, jax.nn.elu(inp["k"]) + 1
  o, S = jax.jit(functools.partial(ops.gla, output_final_state=True, normalize=normalize,
                                   method="chunk", chunk_size=16))(**inp)
  step = jax.jit(functools.partial(ops.gla_step, normalize=normalize))
  state, outs = None, []
  for t in range(T):
    g = None if inp["g"] is None else inp["g"][:, t]
    ot, state = step(state, inp["q"][:, t], inp["k"][:, t], inp["v"][:, t], g)
    outs.append(ot)
  assert rel_err(o, jnp.stack(outs, 1)) < FP32_TOL
  assert rel_err(S, state) < FP32_TOL
  # [B, 1, H, D] inputs keep the time axis
  g = None if inp["g"] is None else inp["g"][:, :1]
  o1, _ = ops.gla_step(None, inp["q"][:, :1], inp["k"][:, :1], inp["v"][:, :1], g,
                       normalize=normalize)
  assert o1.shape == (2, 1, 2, 8) and rel_err(o[:, :1], o1) < FP32_TOL


@pytest.mark.parametrize("gate", [None, "head"])
def test_normalize_matches_numpy(gate):
  B, T, H, K, V = 1, 21, 2, 8, 5
  inp = make_inputs(19, B, T, H, K, V, gate=gate, h0=False)
  q, k = jax.nn.elu(inp["q"]) + 1, jax.nn.elu(inp["k"]) + 1
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, inp["v"]))
  gn = np.zeros((B, T, H)) if gate is None else np.asarray(inp["g"], np.float64)
  cum = np.cumsum(gn, 1)
  want = np.zeros((B, T, H, V))
  for t in range(T):
    w = np.exp(cum[:, t:t + 1] - cum[:, :t + 1])          # decay from s to t (float64)
    att = np.einsum("bhk,bshk->bsh", qn[:, t], kn[:, :t + 1]) * w
    want[:, t] = np.einsum("bsh,bshv->bhv", att, vn[:, :t + 1]) / att.sum(1)[..., None]
  z = np.einsum("bshk,bsh->bhk", kn, np.exp(cum[:, -1:] - cum))   # decayed key sum
  method = "recurrent" if gate is None else "chunk"
  o, S = ops.gla(q, k, inp["v"], inp["g"], normalize=True, output_final_state=True,
                 method=method, chunk_size=16, eps=0.0)
  assert rel_err(want, o) < FP32_TOL
  assert S.shape == (B, H, K, V + 1) and rel_err(z, S[..., -1]) < FP32_TOL


def test_fla_naive_gla_and_simple_gla():
  torch = pytest.importorskip("torch")
  fla_gla, fla_simple = load_fla_naive("gla"), load_fla_naive("simple_gla")
  if fla_gla is None or fla_simple is None:
    pytest.skip("fla-core is not installed")
  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  inp = make_inputs(23, 2, 63, 2, 60, 36, gate="channel", strength="mixed")
  o_ref, S_ref = fla_gla.naive_recurrent_gla(t(inp["q"]), t(inp["k"]), t(inp["v"]), t(inp["g"]),
                                             initial_state=t(inp["initial_state"]),
                                             output_final_state=True)
  o, S = jax.jit(functools.partial(ops.gla, output_final_state=True, chunk_size=16))(**inp)
  assert rel_err(o_ref.numpy(), o) < FP32_TOL and rel_err(S_ref.numpy(), S) < FP32_TOL
  inp = make_inputs(29, 2, 63, 2, 60, 36, gate="head", strength="mixed")
  o_ref, S_ref = fla_simple.naive_recurrent_simple_gla(
      t(inp["q"]), t(inp["k"]), t(inp["v"]), t(inp["g"]), scale=0.3,
      initial_state=t(inp["initial_state"]), output_final_state=True)
  o, S = jax.jit(functools.partial(ops.gla, scale=0.3, output_final_state=True,
                                   method="assoc_scan", chunk_size=32))(**inp)
  assert rel_err(o_ref.numpy(), o) < FP32_TOL and rel_err(S_ref.numpy(), S) < FP32_TOL


def test_auto_and_pallas_dispatch(monkeypatch):
  inp = make_inputs(31, 1, 20, 1, 8, 8, gate="head", h0=False)
  o_auto, _ = ops.gla(**inp)                        # chunk on CPU
  o_chunk, _ = ops.gla(**inp, method="chunk")
  np.testing.assert_array_equal(np.asarray(o_auto), np.asarray(o_chunk))
  # method="pallas" hands every argument to pallas_kernels.gla_chunk (interpret on CPU); the
  # kernel itself is tested in tests/test_pallas.py.
  import pallas_kernels
  seen = {}
  def fake(q, k, v, g, **kw):
    seen.update(kw, v_shape=v.shape)
    return ops.gla(q, k, v, g, scale=kw["scale"], initial_state=kw["initial_state"],
                   output_final_state=kw["output_final_state"], cu_seqlens=kw["cu_seqlens"],
                   method="recurrent")
  monkeypatch.setattr(pallas_kernels, "gla_chunk", fake, raising=False)
  o_p, S_p = ops.gla(**inp, method="pallas", chunk_size=32, normalize=True,
                     output_final_state=True)
  o_n, S_n = ops.gla(**inp, method="chunk", normalize=True, output_final_state=True)
  assert seen["interpret"] is True and seen["chunk_size"] == 32 and seen["v_shape"][-1] == 9
  assert rel_err(o_n, o_p) < FP32_TOL and rel_err(S_n, S_p) < FP32_TOL
  monkeypatch.delattr(pallas_kernels, "gla_chunk")
  with pytest.raises(NotImplementedError, match="gla_chunk"):
    ops.gla(**inp, method="pallas")


@pytest.mark.parametrize("bad,match", [
    (dict(q=jnp.zeros((2, 5, 3))), r"`q` must have shape \[B, T, H, K\]"),
    (dict(k=jnp.zeros((2, 5, 3, 7))), r"`k` must have shape \[B, T, H, K\]"),
    (dict(v=jnp.zeros((2, 6, 3, 4))), r"`v` must have shape \[B, T, H, V\]"),
    (dict(g=jnp.zeros((2, 5, 4))), r"`g` must have shape \[B, T, H\]"),
    (dict(g=jnp.zeros((2, 5, 3), jnp.int32)), r"`g` must be a floating"),
    (dict(initial_state=jnp.zeros((2, 3, 8, 5))), r"`initial_state` must have shape \[B, H, K, V\]"),
    (dict(q=jnp.zeros((2, 5, 3, 8), jnp.int32)), r"`q` must be a floating"),
    (dict(v=jnp.zeros((2, 5, 3, 4), jnp.bfloat16)), r"share a dtype"),
    (dict(method="fast"), r"`method` must be one of"),
    (dict(chunk_size=0), r"`chunk_size` must be a positive int"),
    (dict(cu_seqlens=jnp.array([0, 3, 5])), r"`cu_seqlens` needs a packed batch"),
    (dict(normalize=True, initial_state=jnp.zeros((2, 3, 8, 4))), r"V \+ 1"),
])
def test_errors_name_the_argument(bad, match):
  args = dict(q=jnp.zeros((2, 5, 3, 8)), k=jnp.zeros((2, 5, 3, 8)), v=jnp.zeros((2, 5, 3, 4)))
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    ops.gla(**args)


@pytest.mark.parametrize("op", ["gla_step", "delta_rule_step"])
@pytest.mark.parametrize("bad,match", [
    (dict(q=jnp.zeros((2, 2, 3, 8)), k=jnp.zeros((2, 2, 3, 8)), v=jnp.zeros((2, 2, 3, 4))),
     r"`q` for {op} must be \[B, H, K\] or \[B, 1, H, K\]"),
    (dict(q=jnp.zeros((2, 8))), r"`q` must have shape \[B, H, K\] \(rank 3\)"),
    (dict(k=jnp.zeros((2, 3, 7))), r"`k` must have shape \[B, H, K\] = \(2, 3, 8\)"),
    (dict(v=jnp.zeros((2, 4, 4))), r"`v` must have shape \[B, H, V\] = \(2, 3, V\)"),
    (dict(state=jnp.zeros((2, 3, 8, 5))), r"`state` must have shape \[B, H, K, V\] = \(2, 3, 8, 4\)"),
])
def test_step_errors_name_the_argument(op, bad, match):
  """Both decode steps share their q / k / v / state checks: each names the argument and the
  shape it expected; a time axis longer than one token is refused by name."""
  args = dict(state=None, q=jnp.zeros((2, 3, 8)), k=jnp.zeros((2, 3, 8)), v=jnp.zeros((2, 3, 4)))
  if op == "delta_rule_step":
    args["beta"] = jnp.ones((2, 2, 3)) if bad.get("q", args["q"]).ndim == 4 else jnp.ones((2, 3))
  args.update(bad)
  with pytest.raises(ValueError, match=match.format(op=op)):
    getattr(ops, op)(**args)


def test_step_time_axis_matches_untimed():
  """[B, 1, H, .] inputs give the same output (time axis kept) and state as [B, H, .]."""
  ks = jax.random.split(jax.random.PRNGKey(3), 5)
  q, k = (jax.random.normal(x, (2, 3, 8)) for x in ks[:2])
  v = jax.random.normal(ks[2], (2, 3, 4))
  g = -jax.nn.softplus(jax.random.normal(ks[3], (2, 3)))
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (2, 3)))
  S0 = 0.1 * jnp.ones((2, 3, 8, 4))
  t = lambda x: x[:, None]
  for o, S, o1, S1 in [(*ops.gla_step(S0, q, k, v, g), *ops.gla_step(S0, t(q), t(k), t(v), t(g))),
                       (*ops.delta_rule_step(S0, q, k, v, beta, g),
                        *ops.delta_rule_step(S0, t(q), t(k), t(v), t(beta), t(g)))]:
    assert o1.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(o1[:, 0], o)
    np.testing.assert_array_equal(S1, S)


@pytest.mark.parametrize("gate,method", [
    (None, "chunk"), ("channel", "chunk"), pytest.param("head", "assoc_scan", marks=pytest.mark.slow),
    pytest.param("channel", "parallel", marks=pytest.mark.slow),
    pytest.param("head", "recurrent", marks=pytest.mark.slow),
    pytest.param("channel", "pallas", marks=pytest.mark.slow)])
def test_segment_ids_reset_per_document(gate, method):
  """Packed [B, T] rows vs the token-by-token reference (state zeroed wherever the id
  changes): values, final state, every gradient; one document == a separate call."""
  check_segment_ids("gla", gate, method)


def test_segment_ids_errors():
  check_segment_id_errors("gla")
