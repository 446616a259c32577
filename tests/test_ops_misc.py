"""Feature maps, softmax attention against the reference, packed-batch helpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import ops
from linjax.ops import feature_maps as fm
from linjax.ops import reference, varlen
from tests.helpers import rel_err

KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------------------------------- feature maps

def test_simple_feature_maps():
  x = jax.random.normal(KEY, (2, 5, 3, 8))
  xn = np.asarray(x, np.float64)
  np.testing.assert_array_equal(fm.identity(x), x)
  np.testing.assert_allclose(fm.relu(x), np.maximum(xn, 0))
  np.testing.assert_allclose(fm.elu(x), np.where(xn > 0, xn + 1, np.exp(xn)), rtol=1e-6)
  assert (fm.elu(x) > 0).all()
  sm = fm.softmax(x)
  np.testing.assert_allclose(sm, np.exp(xn) / np.exp(xn).sum(-1, keepdims=True), rtol=1e-5)
  l2 = xn / np.sqrt((xn ** 2).sum(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(fm.l2(x), l2, rtol=1e-5)
  silu = xn / (1 + np.exp(-xn))
  np.testing.assert_allclose(fm.silu_l2(x), silu / np.sqrt((silu ** 2).sum(-1, keepdims=True) + 1e-6),
                             rtol=1e-5, atol=1e-7)
  for kind in ("identity", "elu", "relu", "softmax", "silu_l2", "l2", "dpfp"):
    np.testing.assert_array_equal(fm.apply(kind, x), getattr(fm, kind)(x))
    assert fm.apply(kind, x).shape[-1] == fm.output_dim(kind, 8)


@pytest.mark.parametrize("per_head", [True, False])
def test_t2r_and_hedgehog(per_head):
  """Against the formulas written out in numpy: T2R relu(xW + b); Hedgehog as LoLCATs ships
  it, [softmax(xW + b), softmax(-(xW + b))] each over its own half, floored at 1e-12."""
  H, D, F = 3, 8, 6
  x = jax.random.normal(KEY, (2, 5, H, D))
  k1, k2 = jax.random.split(KEY)
  w = jax.random.normal(k1, (H, D, F) if per_head else (D, F))
  b = jax.random.normal(k2, (H, F) if per_head else (F,))
  xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
  z = np.einsum("bthd,hdf->bthf", xn, wn) if per_head else np.einsum("bthd,df->bthf", xn, wn)
  z = z + np.asarray(b, np.float64)
  np.testing.assert_allclose(fm.t2r(x, w, b), np.maximum(z, 0), rtol=1e-5, atol=1e-6)
  sm = lambda a: np.exp(a - a.max(-1, keepdims=True)) / np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)
  want = np.maximum(np.concatenate([sm(z), sm(-z)], -1), 1e-12)
  got = fm.hedgehog(x, w, b)
  assert got.shape == (2, 5, H, 2 * F)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[..., :F].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(got[..., F:].sum(-1), 1.0, rtol=1e-5)
  # a large projection drives some features below the floor: they are 1e-12, never 0
  big = fm.hedgehog(x * 100, w, b)
  assert float(big.min()) == pytest.approx(1e-12)
  assert fm.output_dim("hedgehog", D, F) == 2 * F and fm.output_dim("t2r", D, F) == F
  np.testing.assert_array_equal(fm.apply("hedgehog", x, w, b), got)


def test_feature_map_errors_name_the_argument():
  x = jnp.zeros((2, 5, 3, 8))
  with pytest.raises(ValueError, match=r"`w` must have shape \[H, D, F\]"):
    fm.t2r(x, jnp.zeros((4, 8, 6)))
  with pytest.raises(ValueError, match=r"`b` must have shape"):
    fm.hedgehog(x, jnp.zeros((3, 8, 6)), jnp.zeros((6,)))
  with pytest.raises(ValueError, match="unknown feature map"):
    fm.apply("cosine", x)
  with pytest.raises(ValueError, match="needs a weight"):
    fm.apply("hedgehog", x)


@pytest.mark.parametrize("nu", [1, 2])
def test_dpfp(nu):
  x = np.asarray(jax.random.normal(KEY, (2, 3, 4)))
  r = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], -1)
  want = np.concatenate([r * np.roll(r, j, axis=-1) for j in range(1, nu + 1)], -1)
  got = fm.dpfp(jnp.asarray(x), nu)
  assert got.shape[-1] == fm.output_dim("dpfp", 4, nu=nu) == 8 * nu
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_feature_maps_feed_normalized_linear_attention():
  """Hedgehog features with normalize=True: each output is a convex mix of the values."""
  B, T, H, D, F = 1, 30, 2, 8, 4
  ks = jax.random.split(KEY, 4)
  w = jax.random.normal(ks[0], (H, D, F))
  q = fm.hedgehog(jax.random.normal(ks[1], (B, T, H, D)), w)
  k = fm.hedgehog(jax.random.normal(ks[2], (B, T, H, D)), w)
  v = jax.random.uniform(ks[3], (B, T, H, 5))
  o, _ = ops.gla(q, k, v, normalize=True, eps=0.0)
  vmax = jax.lax.cummax(v, axis=1)
  vmin = -jax.lax.cummax(-v, axis=1)
  assert (o <= vmax + 1e-5).all() and (o >= vmin - 1e-5).all()


# ----------------------------------------------------------------------------- softmax attention

def _qkv(B, T, Hq, Hkv, D, S=None, key=KEY):
  S = T if S is None else S
  ks = jax.random.split(key, 3)
  return (jax.random.normal(ks[0], (B, T, Hq, D)), jax.random.normal(ks[1], (B, S, Hkv, D)),
          jax.random.normal(ks[2], (B, S, Hkv, D)))


@pytest.mark.parametrize("kw", [
    dict(causal=False),
    dict(causal=True),
    dict(causal=True, window=7),
    dict(causal=True, window=7, num_sinks=3),
])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_attention_matches_reference(kw, Hkv):
  q, k, v = _qkv(2, 37, 4, Hkv, 16)
  want = reference.softmax_attention(q, k, v, **kw)
  assert rel_err(want, ops.attention(q, k, v, **kw)) < 1e-5


def test_attention_segments_and_bf16():
  q, k, v = _qkv(2, 40, 4, 2, 16)
  seg = jnp.concatenate([jnp.zeros((2, 15), jnp.int32), jnp.ones((2, 25), jnp.int32)], 1)
  want = jax.jit(reference.softmax_attention, static_argnames="window")(
      q, k, v, segment_ids=seg, window=9)
  att = jax.jit(ops.attention, static_argnames="window")
  assert rel_err(want, att(q, k, v, segment_ids=seg, window=9)) < 1e-5
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  o = att(*bf, segment_ids=seg, window=9)
  assert o.dtype == jnp.bfloat16 and rel_err(want, o) < 2e-2


def test_attention_decode_positions():
  """One query after S - 1 cached keys equals the last row of the full causal pass."""
  q, k, v = _qkv(1, 23, 4, 2, 16)
  full = reference.softmax_attention(q, k, v, window=5, num_sinks=2)
  o = ops.attention(q[:, -1:], k, v, window=5, num_sinks=2)
  assert rel_err(full[:, -1:], o) < 1e-5
  # explicit positions with a cache that has empty (segment -1) slots at the end
  pad = 9
  kp = jnp.concatenate([k, jnp.zeros((1, pad, 2, 16))], 1)
  vp = jnp.concatenate([v, jnp.zeros((1, pad, 2, 16))], 1)
  kv_seg = jnp.concatenate([jnp.zeros((1, 23), jnp.int32), -jnp.ones((1, pad), jnp.int32)], 1)
  o2 = ops.attention(q[:, -1:], kp, vp, window=5, num_sinks=2, q_positions=jnp.array([[22]]),
                     kv_positions=jnp.arange(23 + pad)[None], kv_segment_ids=kv_seg)
  assert rel_err(full[:, -1:], o2) < 1e-5


def test_attention_errors_name_the_argument():
  q, k, v = _qkv(1, 5, 4, 3, 8)
  with pytest.raises(ValueError, match="multiple"):
    ops.attention(q, k, v)
  with pytest.raises(ValueError, match=r"`q` must have shape"):
    ops.attention(q[0], k, v)


# ----------------------------------------------------------------------------- packed batches

def test_unpack_repack_roundtrip():
  cu = jnp.array([0, 4, 4, 9, 10])
  x = jnp.arange(12.0).reshape(1, 12, 1)
  L = varlen.check_cu_seqlens(cu, 12, 1)
  assert L == 5
  up = varlen.unpack(x, cu, L)
  assert up.shape == (4, 5, 1)
  np.testing.assert_array_equal(up[2, :, 0], [4, 5, 6, 7, 8])
  np.testing.assert_array_equal(up[1], 0)
  back = varlen.repack(up, cu, 12)
  np.testing.assert_array_equal(back[0, :10, 0], np.arange(10.0))
  np.testing.assert_array_equal(back[0, 10:], 0)      # tokens after cu[-1] belong to nobody
  with pytest.raises(ValueError, match="non-decreasing"):
    varlen.check_cu_seqlens(jnp.array([0, 5, 3]), 12, 1)
  with pytest.raises(ValueError, match="max_seqlen"):
    varlen.check_cu_seqlens(cu, 12, 1, max_seqlen=3)


def test_every_listed_method_is_tested_and_auto_computes_the_reference():
  """Every name in `ops.METHODS` is checked against the token-by-token reference somewhere:
  the jnp methods by test_ops_gla / test_ops_delta `test_methods_match_reference`, pallas by
  tests/test_pallas.py and `test_auto_and_pallas_dispatch`, auto here (a method added to the
  list without a test fails this); a name outside the list is refused."""
  from tests import test_ops_delta, test_ops_gla
  from tests.ops_util import make_inputs
  covered = set(test_ops_gla.METHODS) & set(test_ops_delta.METHODS) | {"auto", "pallas"}
  assert set(ops.METHODS) <= covered, set(ops.METHODS) - covered
  for op, ref, delta in ((ops.gla, reference.gla, False), (ops.delta_rule, reference.delta_rule, True)):
    inp = make_inputs(3, 1, 21, 2, 16, 8, gate="head", delta=delta)
    want, S_want = ref(**inp, output_final_state=True)
    o, S = op(**inp, output_final_state=True, method="auto", chunk_size=16)
    assert rel_err(want, o) < 1e-4 and rel_err(S_want, S) < 1e-4, op.__name__
    with pytest.raises(ValueError, match="must be one of"):
      op(**inp, method="fastest")


@pytest.mark.parametrize("C", [1, 16, 37, 64])
def test_inv_unit_lower_matches_numpy_inverse(C):
  """The UT-transform inverse used by the delta rule (no LAPACK solve; see _common.py)."""
  from pallas_kernels._common import inv_unit_lower
  L = jnp.tril(jax.random.normal(jax.random.key(C), (2, C, C)) * 0.3, -1)
  ref = np.linalg.inv(np.eye(C) + np.asarray(L, np.float64))
  assert rel_err(ref, inv_unit_lower(L)) < 1e-6
