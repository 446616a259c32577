"""Each training objective against a hand computation in numpy, and the hybrid
initialisations that equal the sliding-window baseline at step 0."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linjax.linearize import linearize, set_distill
from linjax.models.llama import Llama, LlamaConfig
from linjax.train.objectives import make_objective

V = 61


def tiny(mixers="softmax", layers=2, seed=0):
  cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=128, mixers=mixers)
  return Llama(cfg, rngs=nnx.Rngs(seed))


def batch(B=2, T=24, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, V, (B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  mask[-1, -5:] = 0.0                                 # some masked targets
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          "segment_ids": np.ones((B, T), np.int32)}


def np_logsoftmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_ce_kl_and_z_loss_by_hand():
  student, teacher = tiny(seed=0), tiny(seed=1)
  b = batch()
  zs = np.asarray(student(b["input_ids"])[0], np.float64)
  zt = np.asarray(teacher(b["input_ids"])[0], np.float64)
  m = b["loss_mask"].astype(bool)
  ls = np_logsoftmax(zs)
  ce = -np.take_along_axis(ls, b["targets"][..., None], -1)[..., 0][m].mean()
  tau = 2.0
  pt, ps = np_logsoftmax(zt / tau), np_logsoftmax(zs / tau)
  kl = ((np.exp(pt) * (pt - ps)).sum(-1) * tau ** 2)[m].mean()
  logz = np.log(np.exp(zs - zs.max(-1, keepdims=True)).sum(-1)) + zs.max(-1)
  z = (logz ** 2)[m].mean()
  obj = make_objective({"ce": 1.0, "kl": 0.5, "z_loss": 1e-2}, kl_temperature=tau)
  loss, met = obj(student, None, teacher, b)
  assert float(met["ce"]) == pytest.approx(ce, rel=1e-5)
  assert float(met["kl"]) == pytest.approx(kl, rel=1e-4)
  assert float(met["z_loss"]) == pytest.approx(z, rel=1e-5)
  assert float(loss) == pytest.approx(ce + 0.5 * kl + 1e-2 * z, rel=1e-5)
  assert float(met["tokens"]) == m.sum()
  # KL of a model with itself is zero
  _, met = make_objective({"kl": 1.0})(teacher, None, teacher, b)
  assert abs(float(met["kl"])) < 1e-6


def _hand_terms(student, teacher, b, tau):
  zs = np.asarray(student(b["input_ids"], b["positions"], b["segment_ids"])[0], np.float64)
  zt = np.asarray(teacher(b["input_ids"], b["positions"], b["segment_ids"])[0], np.float64)
  m = b["loss_mask"].astype(bool)
  ce = -np.take_along_axis(np_logsoftmax(zs), b["targets"][..., None], -1)[..., 0][m].mean()
  pt, ps = np_logsoftmax(zt / tau), np_logsoftmax(zs / tau)
  kl = ((np.exp(pt) * (pt - ps)).sum(-1) * tau ** 2)[m].mean()
  logz = np.log(np.exp(zs - zs.max(-1, keepdims=True)).sum(-1)) + zs.max(-1)
  return {"ce": ce, "kl": kl, "z_loss": (logz ** 2)[m].mean()}


@pytest.mark.parametrize("chunk", [5, 24, 64])
def test_loss_chunk_matches_the_whole_sequence_and_the_hand_computation(chunk):
  """loss_chunk > 0 (the LM head over `chunk` positions at a time, rematerialised): the same
  ce / kl / z_loss as numpy on the full logits, and the same student gradients as the
  whole-sequence objective, for a chunk that does not divide T (5), and for chunks that equal
  or exceed T (the whole-sequence path);
  packed rows and masked targets included, an untied LM head and a linearized student."""
  cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=False, initializer_range=0.2)
  teacher = Llama(cfg, rngs=nnx.Rngs(1))
  student = linearize(Llama(cfg, rngs=nnx.Rngs(2)), "lolcats", window=4, num_sinks=1,
                      init_linear_factor=0.5)
  b = batch()
  b["segment_ids"][0, 10:] = 2                        # two packed documents in row 0
  b["positions"][0, 10:] = np.arange(14)
  b["loss_mask"][0, 9] = 0.0
  tau = 2.0
  weights = {"ce": 1.0, "kl": 0.5, "z_loss": 1e-2}
  want = _hand_terms(student, teacher, b, tau)
  whole = make_objective(weights, kl_temperature=tau)
  chunked = make_objective(weights, kl_temperature=tau, loss_chunk=chunk)
  _, met = chunked(student, None, teacher, b)
  assert want["kl"] > 0.1                             # two different models
  for k, v in want.items():
    assert float(met[k]) == pytest.approx(v, rel=1e-5), k

  def grads(obj):
    gdef, params, rest = nnx.split(student, nnx.Param, ...)
    f = lambda p: obj(nnx.merge(gdef, p, rest), None, teacher, b)[0]
    return jax.jit(jax.value_and_grad(f))(params)

  (l0, g0), (l1, g1) = grads(whole), grads(chunked)
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_loss_chunk_needs_a_model_with_a_head():
  class NoHead(nnx.Module):
    def __call__(self, ids, **kw):
      return jnp.zeros(ids.shape + (V,))
  with pytest.raises(ValueError, match="final_hidden.*NoHead"):
    make_objective({"ce": 1.0}, loss_chunk=8)(NoHead(), None, None, batch())
  with pytest.raises(ValueError, match="loss_chunk must be >= 0"):
    make_objective({"ce": 1.0}, loss_chunk=-1)


def _teacher_heads_np(layer_attn, x, positions):
  """Softmax attention heads (before o_proj) of the teacher's projections, numpy float64."""
  a = layer_attn
  B, T, _ = x.shape
  H, Hkv, D = a.num_heads, a.num_kv_heads, a.head_dim
  q = np.asarray(a.rotate(a.q_proj(x).reshape(B, T, H, D), positions), np.float64)
  k = np.asarray(a.rotate(a.k_proj(x).reshape(B, T, Hkv, D), positions), np.float64)
  v = np.asarray(a.v_proj(x).reshape(B, T, Hkv, D), np.float64)
  k, v = np.repeat(k, H // Hkv, 2), np.repeat(v, H // Hkv, 2)
  s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhij,bjhd->bihd", p, v), p


def perturb(model, param_type, scale, seed):
  """Moves every `param_type` parameter off its init by scale * N(0, 1)."""
  leaves, tree = jax.tree.flatten(nnx.state(model, param_type))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                              for x, k in zip(leaves, keys)]))


def mse_by_hand(teacher, student, b, layers):
  """Per-layer mean((student heads - teacher softmax heads)^2) on the teacher's hidden states."""
  hs = teacher.hidden_states(b["input_ids"])
  pos = jnp.asarray(b["positions"])
  want = []
  for i in layers:
    x = hs["mixer_inputs"][i]
    ty, _ = _teacher_heads_np(teacher.layers[i].self_attn, x, pos)
    sy, _ = student.layers[i].self_attn.heads(x, positions=pos)
    want.append(((np.asarray(sy, np.float64) - ty) ** 2).mean())
  return want


@pytest.mark.parametrize("mixer,kw", [("lolcats", dict(window=6)), ("gla", {}), ("liger", dict(window=6))])
def test_attention_mse_by_hand(mixer, kw):
  """attention_mse = mean over linearized layers of mean((student heads - teacher heads)^2)
  on the teacher's hidden states (teacher-forced). The new parameters are moved off their
  init (what stage 1 trains); the projections are the teacher's."""
  from linjax.layers.params import FeatureMapParam
  teacher = tiny()
  student = linearize(teacher, mixer, **kw)
  perturb(student, FeatureMapParam, 0.05, seed=3)
  b = batch(B=1, T=20)
  want = mse_by_hand(teacher, student, b, range(len(student.layers)))
  distilled = set_distill(nnx.clone(student), "mse")
  loss, met = make_objective({"attention_mse": 1.0}, transfer_scale=10.0)(None, distilled, None,
                                                                           {**b, "segment_ids": None})
  assert float(met["attention_mse"]) == pytest.approx(np.mean(want), rel=2e-4)
  assert float(met["attention_mse_max"]) == pytest.approx(np.max(want), rel=2e-4)
  assert float(loss) == pytest.approx(10.0 * np.mean(want), rel=2e-4)


def test_attention_transfer_is_teacher_forced_with_lora_and_kept_softmax_layers():
  """Stage 1 with LoRA on q / k / v / o and a softmax layer kept: every layer still sees the
  teacher's hidden states, and each layer's transfer loss reaches only its own adapters.
  Adapters moved off zero: on o_proj or in the softmax layer they would move the hidden states
  the later layers are scored on (the loss is then no longer fidelity to the teacher)."""
  from linjax.layers.lora import LoRAParam, apply_lora
  teacher = tiny(layers=3)
  student = linearize(teacher, "lolcats", layers=[0, 2], window=6)
  apply_lora(student, rank=4, alpha=4.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
             rngs=nnx.Rngs(1))
  perturb(student, LoRAParam, 0.3, seed=5)
  b = batch(B=1, T=20)
  want = mse_by_hand(teacher, student, b, (0, 2))       # the student heads with the adapters
  distilled = set_distill(nnx.clone(student), "mse")
  obj = make_objective({"attention_mse": 1.0})
  gdef, lora, rest = nnx.split(distilled, LoRAParam, ...)

  def loss_of(lora):
    return obj(None, nnx.merge(gdef, lora, rest), None, {**b, "segment_ids": None})[0]
  loss, grads = jax.value_and_grad(loss_of)(lora)
  assert float(loss) == pytest.approx(np.mean(want), rel=2e-4)
  norms = {}
  for path, v in nnx.to_flat_state(grads):
    path = tuple(map(str, path))
    proj = (path[1], next(p for p in path if p.endswith("_proj")))   # (layer, projection)
    norms[proj] = norms.get(proj, 0.0) + float(jnp.abs(v[...]).sum())
  assert len(norms) == 12
  for (layer, proj), n in norms.items():
    if layer in ("0", "2") and proj != "o_proj":
      assert n > 0, (layer, proj)
    else:                       # o_proj adapters and the softmax layer's: no gradient
      assert n == 0, (layer, proj)


def test_attention_xent_and_hidden_mse_by_hand():
  teacher = tiny()
  student = linearize(teacher, "linear", feature_map="hedgehog")
  b = batch(B=1, T=16)
  hs = teacher.hidden_states(b["input_ids"])
  pos = jnp.asarray(b["positions"])
  want = []
  for i, layer in enumerate(student.layers):
    x = hs["mixer_inputs"][i]
    _, tp = _teacher_heads_np(teacher.layers[i].self_attn, x, pos)
    sw = np.asarray(layer.self_attn.attention_weights(x, positions=pos), np.float64)
    ce = -(tp * np.log(np.where(tp > 0, sw, 1.0))).sum(-1)      # [B, H, T]
    want.append(ce.mean())
  distilled = set_distill(nnx.clone(student), "xent")
  _, met = make_objective({"attention_xent": 1.0})(None, distilled, None, {**b, "segment_ids": None})
  assert float(met["attention_xent"]) == pytest.approx(np.mean(want), rel=1e-4)
  # hidden_mse: the residual stream after every layer (and the final one), student vs teacher
  hsd = student.hidden_states(b["input_ids"])
  errs = [((np.asarray(a, np.float64) - np.asarray(c, np.float64)) ** 2).mean()
          for a, c in zip(hsd["layer_inputs"][1:] + [hsd["final"]],
                          hs["layer_inputs"][1:] + [hs["final"]])]
  _, met = make_objective({"hidden_mse": 1.0})(student, None, teacher, b)
  assert float(met["hidden_mse"]) == pytest.approx(np.mean(errs), rel=1e-4)


@pytest.mark.parametrize("mixer,kw", [
    ("lolcats", dict(window=8, num_sinks=2, init_linear_factor=0.0)),
    ("liger", dict(window=8, num_sinks=2, learn_mix=True, mix=1.0))])
def test_hybrid_init_equals_the_sliding_window_baseline(mixer, kw):
  """The linjax hybrid initialisations give the sliding window + sinks logits at step 0
  (the window softmax alone), and move off it as soon as their new factor moves."""
  teacher = tiny()
  b = batch(B=2, T=40)
  swa = linearize(teacher, "sliding_window", window=8, num_sinks=2)
  student = linearize(teacher, mixer, **kw)
  want = np.asarray(swa(b["input_ids"])[0])
  got = np.asarray(student(b["input_ids"])[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  name = "linear_factors" if mixer == "lolcats" else "window_mix"
  for layer in student.layers:
    p = getattr(layer.self_attn, name)
    p[...] = p[...] + (0.5 if mixer == "lolcats" else -0.5)
  moved = np.asarray(student(b["input_ids"])[0])
  assert np.abs(moved - want).max() > 1e-3


def test_calibrate_fits_the_supra_norm_affine_to_the_teacher():
  """After calibration the SUPRA layer's output is the least-squares affine fit of the
  teacher's attention output (checked against numpy's lstsq per head and channel)."""
  from linjax.linearize.calibrate import calibrate
  teacher = tiny()
  student = linearize(teacher, "supra", norm_affine=True)
  toks = jnp.asarray(batch(B=2, T=32)["input_ids"])
  pos = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))
  hs = teacher.hidden_states(toks, positions=pos)
  m = student.layers[0].self_attn
  x = hs["mixer_inputs"][0]
  n = np.asarray(m.heads(x, positions=pos)[0], np.float64).reshape(64, -1)  # unit affine
  ty, _ = _teacher_heads_np(teacher.layers[0].self_attn, x, pos)
  t = ty.reshape(64, -1)
  rep = calibrate(student, teacher, toks)
  assert set(rep) == {0, 1}
  got = np.asarray(m.heads(x, positions=pos)[0], np.float64).reshape(64, -1)
  for c in (0, 5, 17, n.shape[1] - 1):
    A = np.stack([n[:, c], np.ones(64)], 1)
    coef, *_ = np.linalg.lstsq(A, t[:, c], rcond=None)
    np.testing.assert_allclose(got[:, c], A @ coef, rtol=1e-4, atol=1e-6)
  assert rep[0] < 1.0
