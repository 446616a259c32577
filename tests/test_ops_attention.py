"""linjax.ops.attention's methods against the token-by-token reference: values, gradients,
log-sum-exp stats, sinks, packed rows, GQA, odd lengths, T < window; the Pallas flash kernels
(interpret mode) and the method resolution per platform."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import ops
from linjax.ops import reference
from linjax.ops.softmax import method_for_platform
from tests.helpers import assert_rel, rel_err

jax.config.update("jax_default_matmul_precision", "highest")


def qkv(B, T, Hq, Hkv, D, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, Hq, D)), jax.random.normal(ks[1], (B, T, Hkv, D)),
          jax.random.normal(ks[2], (B, T, Hkv, D)))


def packed(B, T, cut):
  seg = jnp.concatenate([jnp.ones((B, cut), jnp.int32), 2 * jnp.ones((B, T - cut), jnp.int32)], 1)
  pos = jnp.concatenate([jnp.arange(cut), jnp.arange(T - cut)])[None].repeat(B, 0).astype(jnp.int32)
  return seg, pos


CASES = [(dict(), False), (dict(window=7, num_sinks=3), False), (dict(window=40), False),
         (dict(window=128), False),          # window > T: every key
         (dict(), True), (dict(window=7, num_sinks=3), True)]


@pytest.mark.parametrize("kw,packed_rows", CASES, ids=lambda c: (
    "-".join(f"{k}{v}" for k, v in c.items()) or "full") if isinstance(c, dict) else
    ("packed" if c else "rows"))
def test_chunk_and_parallel_match_reference(kw, packed_rows):
  T = 45                                   # odd, not a multiple of the block
  q, k, v = qkv(2, T, 4, 2, 8)
  extra, ref_extra = {}, {}
  if packed_rows:                          # positions restart: every document has its own sinks
    seg, pos = packed(2, T, 20)
    extra = dict(segment_ids=seg, q_positions=pos, kv_positions=pos)
    ref_extra = dict(segment_ids=seg, positions=pos)
  want = jax.jit(lambda q, k, v: reference.softmax_attention(q, k, v, **kw, **ref_extra))(q, k, v)
  do = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  ref_loss = lambda q, k, v: (reference.softmax_attention(q, k, v, **kw, **ref_extra) * do).sum()
  g_ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(q, k, v)
  for method, C in (("parallel", 64), ("chunk", 16)):
    f = lambda q, k, v: ops.attention(q, k, v, **kw, **extra, method=method, block_size=C)
    assert_rel(want, jax.jit(f)(q, k, v), 1e-5, f"{method} C={C} {kw}")
    g = jax.jit(jax.grad(lambda q, k, v: (f(q, k, v) * do).sum(), argnums=(0, 1, 2)))(q, k, v)
    for n, a, b in zip("qkv", g_ref, g):
      assert_rel(a, b, 1e-5, f"{method} C={C} {kw} d{n}")


def test_chunk_is_exact_when_some_tokens_differ():
  """Per-token check: changing one value changes exactly the outputs of the queries that see
  it (a blocked form that dropped or duplicated a key would differ somewhere)."""
  T, W = 70, 9
  q, k, v = qkv(1, T, 2, 2, 8, seed=3)
  f = jax.jit(lambda v: ops.attention(q, k, v, window=W, num_sinks=2, method="chunk",
                                      block_size=16))
  base = f(v)
  for j in (0, 1, 5, 33, 69):
    out = f(v.at[:, j].add(1.0))
    changed = np.abs(np.asarray(out - base)).max(axis=(0, 2, 3)) > 1e-6
    sees = np.array([(j <= i) and (i - j < W or j < 2) for i in range(T)])
    np.testing.assert_array_equal(changed, sees, err_msg=f"key {j}")


@pytest.mark.parametrize("kind", ["sliding", "blocks"])
def test_stats_and_block_windows(kind):
  """(o, lse, m) of the chunk form equal the masked form's, gradients through all three."""
  q, k, v = qkv(2, 37, 4, 2, 16, seed=1)
  kw = dict(window=8, num_sinks=2, window_kind=kind, return_stats=True)

  def loss(method):
    def f(q, k, v):
      o, lse, m = ops.attention(q, k, v, method=method, block_size=16, **kw)
      return (o ** 2).sum() + jnp.sin(lse).sum() + jnp.cos(m).sum(), (o, lse, m)
    return f

  vg = lambda m: jax.jit(jax.value_and_grad(loss(m), argnums=(0, 1, 2), has_aux=True))
  (_, a), ga = vg("parallel")(q, k, v)
  (_, b), gb = vg("chunk")(q, k, v)
  for x, y, n in zip(a, b, ("o", "lse", "m")):
    assert_rel(x, y, 1e-5, f"{kind} {n}")
  for x, y in zip(ga, gb):
    assert_rel(x, y, 1e-5, f"{kind} grad")
  # lse is the log-sum-exp of the visible logits (by hand, from the masked scores)
  o, lse, m = a
  vis = ops.attention_mask(jnp.arange(37)[None], jnp.arange(37)[None], window=8, num_sinks=2,
                           window_kind=kind)[0]
  s = np.einsum("thd,shd->hts", np.asarray(q[0, :, :2]), np.asarray(k[0, :, :1].repeat(2, 1))) / 4
  s = np.where(np.asarray(vis)[None], s, -np.inf)
  np.testing.assert_allclose(np.asarray(lse[0, :, :2]).T, np.log(np.exp(s).sum(-1)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(m[0, :, :2]).T, s.max(-1), rtol=1e-5)


def test_merge_over_disjoint_key_sets_equals_one_pass():
  q, k, v = qkv(1, 40, 2, 2, 8, seed=2)
  full = ops.attention(q, k, v, causal=False, method="parallel")
  kw = dict(causal=False, method="parallel", return_stats=True)
  o1, l1, _ = ops.attention(q, k[:, :15], v[:, :15], **kw)
  o2, l2, _ = ops.attention(q, k[:, 15:], v[:, 15:], **kw)
  o, lse = ops.merge_attention([(o1, l1), (o2, l2)])
  assert_rel(full, o, 1e-6, "merged")
  _, l_all, _ = ops.attention(q, k, v, **kw)
  assert_rel(l_all, lse, 1e-6, "merged lse")


def test_window_shorter_than_one_token_and_errors():
  q, k, v = qkv(1, 10, 2, 2, 8)
  o = ops.attention(q, k, v, window=1, method="chunk")
  assert_rel(v, o, 1e-6, "window 1 attends to itself")
  with pytest.raises(ValueError, match="window"):
    ops.attention(q, k, v, window=0)
  with pytest.raises(ValueError, match="method"):
    ops.attention(q, k, v, method="flash")
  with pytest.raises(ValueError, match="self-attention"):
    ops.attention(q[:, :1], k, v, method="chunk")
  with pytest.raises(ValueError, match="cudnn"):
    ops.attention(q, k, v, method="cudnn")       # fp32 is not a cuDNN dtype


def test_auto_resolution_by_platform():
  bf = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
  kw = dict(q=bf, T=256, S=256, window=None, num_sinks=0, segment_ids=None,
            explicit_positions=False, mask=None, causal=True, kv_segment_ids=None)
  pick = lambda platform, **over: method_for_platform(platform, "auto", **dict(kw, **over))
  assert pick("gpu") == "cudnn"
  assert pick("gpu", segment_ids=1) == "pallas"
  assert pick("gpu", segment_ids=1, window=64) == "chunk"
  assert pick("gpu", num_sinks=4, window=64) == "chunk"
  assert pick("gpu", return_stats=True) == "chunk"          # stats: the jnp forms
  assert pick("tpu", segment_ids=1, window=64) == "pallas"
  assert pick("tpu", num_sinks=4, window=64) == "chunk"
  assert pick("cpu", T=4096, S=4096) == "chunk"
  assert pick("cpu", window=64) == "chunk"
  assert pick("cpu", S=512) == "parallel"                    # cross attention / decode
  assert method_for_platform("cpu", "cudnn", **kw) == "chunk"
  assert method_for_platform("gpu", "pallas", **dict(kw, window=64)) == "chunk"


@pytest.mark.parametrize("platform,kw", [("gpu", {}), ("tpu", {}), ("tpu", dict(window=33))])
def test_pallas_flash_kernels_interpret(platform, kw):
  """JAX's Pallas flash kernels behind method='pallas' (Triton on GPU, splash on TPU), run in
  the Pallas interpreter: packed rows, GQA, T not a multiple of the kernel block."""
  from pallas_kernels import attention as pk
  q, k, v = qkv(1, 150, 4, 2, 64, seed=4)
  seg, _ = packed(1, 150, 70)
  want = reference.softmax_attention(q, k, v, segment_ids=seg, **kw)
  o, lse = pk.flash_attention(q, k, v, segment_ids=seg, interpret=True, platform=platform,
                              return_lse=True, **kw)
  assert_rel(want, o, 1e-5, f"{platform} o")
  _, lse_ref, _ = ops.attention(q, k, v, segment_ids=seg, method="parallel", return_stats=True, **kw)
  assert_rel(lse_ref, lse, 1e-5, f"{platform} lse")
  do = jax.random.normal(jax.random.PRNGKey(5), q.shape)
  g = jax.grad(lambda q, k, v: (pk.flash_attention(q, k, v, segment_ids=seg, interpret=True,
                                                   platform=platform, **kw)[0] * do).sum(),
               argnums=(0, 1, 2))(q, k, v)
  gr = jax.grad(lambda q, k, v: (reference.softmax_attention(q, k, v, segment_ids=seg, **kw)
                                 * do).sum(), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(gr, g):
    assert rel_err(a, b) < 1e-5
