"""The teacher's cached top-k (stage field kl_top_k): the top-k + rest KL against numpy, equal
to the full KL at k = vocab (objective values and gradients, whole and chunked head), the
cache computed once and read back bit for bit, and a trainer run on the cache equal to one
with the teacher on the fly."""
import glob
import os

import jax
import numpy as np
import pytest
from flax import nnx

from linjax.models.llama import Llama, LlamaConfig
from linjax.train.config import ConfigError, resolve
from linjax.train.objectives import make_objective, token_kl
from linjax.train.teacher_cache import KEYS, TeacherTopK, topk_kl, topk_logprobs
from linjax.train.trainer import train
from tests.test_objectives import V, batch, np_logsoftmax, tiny
from tests.test_train import flat_params, two_stages


def np_coarse_kl(zt, zs, k, tau):
  """KL between the (k + 1)-bucket distributions (the teacher's top-k tokens, the rest)."""
  pt, ps = np_logsoftmax(zt / tau), np_logsoftmax(zs / tau)
  ids = np.argsort(-pt, -1)[..., :k]
  p, q = np.exp(pt), np.exp(ps)
  pk, qk = np.take_along_axis(p, ids, -1), np.take_along_axis(q, ids, -1)
  p_rest, q_rest = 1.0 - pk.sum(-1), 1.0 - qk.sum(-1)
  kl = (pk * (np.log(pk) - np.log(qk))).sum(-1)
  if k < zt.shape[-1]:
    kl = kl + p_rest * (np.log(p_rest) - np.log(q_rest))
  return kl * tau ** 2


@pytest.mark.parametrize("k", [1, 7, V])
def test_topk_kl_by_hand(k):
  rng = np.random.RandomState(0)
  zt, zs = rng.randn(3, 5, V) * 3.0, rng.randn(3, 5, V) * 3.0
  tau = 2.0
  t = dict(zip(KEYS, topk_logprobs(zt.astype(np.float32), k, tau)))
  got = np.asarray(topk_kl(t, zs.astype(np.float32), tau))
  np.testing.assert_allclose(got, np_coarse_kl(zt, zs, k, tau), rtol=2e-4, atol=1e-6)
  # the rest bucket: log(1 - sum of the top-k probabilities); KL_k never exceeds KL
  pt = np.exp(np_logsoftmax(zt / tau))
  rest = 1.0 - np.sort(pt, -1)[..., ::-1][..., :k].sum(-1)
  if k < V:
    np.testing.assert_allclose(np.exp(np.asarray(t["teacher_rest"])), rest, rtol=1e-4, atol=1e-7)
  full = np.asarray(token_kl(zt.astype(np.float32), zs.astype(np.float32), tau))
  assert (got <= full + 1e-5).all()
  if k == V:
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 5])
def test_cached_topk_at_full_vocab_equals_the_teacher_on_the_fly(tmp_path, chunk):
  """The objective on the cached top-k (k = vocab) = the on-the-fly KL, value and gradient;
  the cache is written once (one file per row) and read back bit for bit; the chunked
  teacher pass (loss_chunk) gives the same arrays as the whole one."""
  student, teacher = tiny(seed=0), tiny(seed=1)
  b = batch()
  cache = TeacherTopK(str(tmp_path / "c"), teacher, V, 2.0, loss_chunk=chunk)
  got = cache.attach(b)
  assert (cache.hits, cache.misses) == (0, 2)
  assert len(glob.glob(str(tmp_path / "c" / "*" / "*.npz"))) == 2
  again = cache.attach(b)
  assert (cache.hits, cache.misses) == (2, 2)
  for k in KEYS:
    np.testing.assert_array_equal(again[k], got[k])
  zt = np.asarray(teacher(b["input_ids"], b["positions"], b["segment_ids"])[0], np.float64)
  ref = np.sort(np_logsoftmax(zt / 2.0), -1)[..., ::-1]
  np.testing.assert_allclose(got["teacher_logp"], ref, rtol=1e-5, atol=1e-5)
  # the on-the-fly objective vs the cached one, with the same student, value and gradients
  weights = {"kl": 1.0, "ce": 0.3}
  fly = make_objective(weights, kl_temperature=2.0, loss_chunk=chunk)
  cached = make_objective(weights, kl_temperature=2.0, loss_chunk=chunk)

  def value_grad(obj, tch, bb):
    gdef, params, rest = nnx.split(student, nnx.Param, ...)
    f = lambda p: obj(nnx.merge(gdef, p, rest), None, tch, bb)[0]
    return jax.jit(jax.value_and_grad(f))(params)

  (l0, g0), (l1, g1) = value_grad(fly, teacher, b), value_grad(cached, None, got)
  assert float(l0) > 0.1
  assert float(l1) == pytest.approx(float(l0), rel=1e-5)
  for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=2e-4, atol=1e-7)
  # a different row is a miss; the same rows under another k or temperature are too
  b2 = dict(b, input_ids=(b["input_ids"] + 1) % V)
  cache.attach(b2)
  assert cache.misses == 4
  other = TeacherTopK(str(tmp_path / "c"), teacher, 8, 2.0, loss_chunk=chunk)
  other.attach(b)
  assert other.misses == 2


def test_the_kl_objective_without_teacher_or_cache_is_an_error():
  with pytest.raises(ValueError, match="needs a teacher.*kl_top_k"):
    make_objective({"kl": 1.0})(tiny(), None, None, batch())
  with pytest.raises(ValueError, match=r"kl_top_k must be in \[1, vocab"):
    TeacherTopK("/tmp/unused", tiny(), V + 1)


def test_kl_top_k_needs_a_kl_term():
  c = two_stages(**{"stages.finetune.kl_top_k": 8, "stages.finetune.objective": {"ce": 1.0}})
  with pytest.raises(ConfigError, match="kl_top_k.*no kl term"):
    resolve(c)
  with pytest.raises(ConfigError, match="kl_top_k' must be >= 0"):
    resolve(two_stages(**{"stages.finetune.kl_top_k": -1}))


def test_trainer_on_the_cache_equals_the_teacher_on_the_fly(tmp_path):
  """Stage 2 of the LoLCATs recipe (LoRA, kl + ce, validation with keep_best) with the
  teacher's top-k cached at k = vocab ends where the on-the-fly run ends; a second run
  sharing the cache computes no row again and ends in the same place; k < vocab trains."""
  fly = train(two_stages(), str(tmp_path / "fly"))
  vocab = fly["model"].config.vocab_size
  shared = str(tmp_path / "shared_cache")
  over = {"stages.finetune.kl_top_k": vocab, "teacher_cache": shared}
  a = train(two_stages(**over), str(tmp_path / "a"))
  st = a["stages"][1]["teacher_cache"]
  assert st["dir"] == shared and st["misses"] > 0
  assert a["stages"][1]["final_loss"] == pytest.approx(fly["stages"][1]["final_loss"], rel=1e-4)
  pf, pa = flat_params(fly["model"]), flat_params(a["model"])
  for k in pf:
    np.testing.assert_allclose(pa[k], pf[k], rtol=1e-4, atol=1e-6, err_msg=k)
  b = train(two_stages(**over), str(tmp_path / "b"))
  assert b["stages"][1]["teacher_cache"]["misses"] == 0
  assert b["stages"][1]["teacher_cache"]["hits"] == st["hits"] + st["misses"]
  pb = flat_params(b["model"])
  for k in pa:
    np.testing.assert_array_equal(pb[k], pa[k], err_msg=k)
  c = train(two_stages(**{"stages.finetune.kl_top_k": 16}), str(tmp_path / "c"))
  assert np.isfinite(c["stages"][1]["final_loss"])
  assert os.listdir(os.path.join(str(tmp_path / "c"), "teacher_topk"))   # default: workdir
