"""Constant-memory decoding: the decode state of every linear and hybrid mixer is the same
size whatever the context it is built for, and a hybrid's key ring holds exactly its window
plus its sinks, also after decoding past them. Softmax attention, the control, grows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linjax.layers.mixers import get_mixer
from tests.test_mixers import IDS, MIXERS, inputs, make_mixer, run, tiny_config

HYBRID_RING = {"lolcats": lambda kw: kw["window"] * (2 if kw.get("variant") == "tk" else 1),
               "liger": lambda kw: kw["window"]}
CASES = [pytest.param(n, kw, id=i) for (n, kw, _), i in zip(MIXERS, IDS)] + [
    pytest.param("lolcats", dict(window=8, num_sinks=3), id="lolcats-sinks"),
    pytest.param("lolcats", dict(window=8, variant="tk", num_sinks=2), id="lolcats-tk-sinks"),
    pytest.param("liger", dict(window=8, num_sinks=3), id="liger-sinks"),
    pytest.param("sliding_window", dict(window=8, num_sinks=2), id="sliding_window-sinks")]


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def cache_shapes(name, kw, batch, max_len):
  m = get_mixer(name)(tiny_config(max_position_embeddings=65536), 0, rngs=nnx.Rngs(0),
                      method="chunk", **kw)
  return jax.eval_shape(lambda: m.init_cache(batch, max_len))


@pytest.mark.parametrize("name,kw", CASES)
def test_cache_does_not_grow_with_context(name, kw):
  small, big = cache_shapes(name, kw, 2, 1024), cache_shapes(name, kw, 2, 65536)
  assert jax.tree.map(lambda a: a.shape, small) == jax.tree.map(lambda a: a.shape, big)
  assert nbytes(small) == nbytes(big)
  # a few KiB per row at this size: states H x F x (V + 1), rings of window + sinks keys
  assert nbytes(small) < 64 * 1024, nbytes(small)
  ring = HYBRID_RING.get(name, (lambda kw: kw["window"]) if name == "sliding_window" else None)
  if ring is not None:
    want = ring(kw) + kw.get("num_sinks", 0)
    for key in ("k", "v", "pos", "seg"):
      assert small[key].shape[1] == want, (key, small[key].shape, want)
  else:
    assert not any(k in small for k in ("k", "v")), sorted(small)


@pytest.mark.parametrize("name,kw", [
    ("lolcats", dict(window=8, num_sinks=3)), ("liger", dict(window=8, num_sinks=2))])
def test_decoding_past_the_window_keeps_the_cache_size(name, kw):
  """A 20-token prefill then 6 decode steps (past window + sinks): every cache leaf
  keeps its shape, and a hybrid's ring holds the sinks and the newest `window` positions."""
  m = make_mixer(name, kw)
  x, pos = inputs(B=1, T=26)
  cache = m.init_cache(1, 64)
  shapes = jax.tree.map(lambda a: a.shape, cache)
  _, cache = run(m, x[:, :20], pos[:, :20], None, cache)
  for t in range(20, 26):
    _, cache = run(m, x[:, t:t + 1], pos[:, t:t + 1], None, cache)
    assert jax.tree.map(lambda a: a.shape, cache) == shapes
  if "pos" in cache:
    S0, W = kw.get("num_sinks", 0), kw.get("window")
    held = sorted(np.asarray(cache["pos"][0])[np.asarray(cache["seg"][0]) >= 0].tolist())
    assert held == list(range(S0)) + list(range(26 - W, 26)), held


def test_softmax_cache_grows_with_context():
  """The control: a full KV cache is as long as max_len (so the size checks above can fail)."""
  small, big = cache_shapes("softmax", {}, 2, 1024), cache_shapes("softmax", {}, 2, 65536)
  assert nbytes(big) == 64 * nbytes(small) > 0


def test_reported_decode_state_separates_the_kept_softmax_cache():
  """The trainer's end-of-run report: a student with one softmax layer kept beside a linear
  one grows by exactly that layer's K and V cache (hand count), the rest is fixed."""
  from linjax.models.llama import Llama
  from linjax.data.tokenizers import ByteTokenizer
  from linjax.train.trainer import generate_samples

  cfg = tiny_config(mixers=("gla", "softmax"), mixer_kwargs=[{"method": "chunk"}, {}],
                    max_position_embeddings=65536, vocab_size=259)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  out = generate_samples(model, None, ByteTokenizer(), ["ab"], 2, context=4096)
  # 4096 more tokens in the one softmax layer: K and V (1 kv head x head dim 16, float32)
  # and each slot's int32 position and segment id
  assert out["student_growing_mib"] == pytest.approx(4096 * (2 * 16 * 4 + 2 * 4) / 2 ** 20)
  gla_state = nbytes(cache_shapes("gla", {}, 1, 4096))
  assert out["student_state_mib"] - out["student_growing_mib"] == pytest.approx(
      gla_state / 2 ** 20, rel=0.05)
