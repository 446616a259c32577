"""The recurrent transformer (linjax.models.recurrent_transformer) against independent
references: the window loop written the paper's way (explicit concatenations, no scan, no
masks), token-by-token decoding, perturbation of other documents, and a learned copy task
that a 2w-position window alone cannot solve."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import linjax
from linjax.models.recurrent_transformer import (RecurrentTransformer,
                                                 RecurrentTransformerConfig,
                                                 RecurrentTransformerConfigError)
from tests.helpers import assert_rel


def tiny(**kw):
  base = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, window=4)
  base.update(kw)
  return RecurrentTransformerConfig(**base)


def model_with_alpha(cfg, alpha=0.7, seed=0):
  m = RecurrentTransformer(cfg, rngs=nnx.Rngs(seed))
  for layer in m.layers:      # away from the 0.5 init, different per layer
    layer.alpha_logit[...] = jnp.asarray(np.log(alpha / (1 - alpha)), jnp.float32)
    alpha = 1 - alpha / 2
  return m


def toks(B=2, T=13, seed=0, vocab=50):
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (B, T)), jnp.int32)


_full = nnx.jit(lambda m, t: m(t)[0])
_cached = nnx.jit(lambda m, t, c, s: m(t, segment_ids=s, cache=c))


def paper_loop(model, tokens):
  """The recurrence of the author's code, one window at a time with explicit concatenation
  (and linjax's documented differences: zero initial memory, the last window emitted like
  the others, rotary positions 0..2w-1 per step)."""
  x = model.embed_tokens(tokens)
  B, T, C = x.shape
  for layer in model.layers:
    w, a, block = layer.window, layer.alpha(), layer.block
    run = lambda z, start: block(z, positions=jnp.broadcast_to(
        start + jnp.arange(z.shape[1]), z.shape[:2]))[0]
    r_old = jnp.zeros((B, w, C))                      # R_{k-2}
    p, outs = None, []
    for k in range(0, T, w):
      wk = x[:, k:k + w]
      L = wk.shape[1]
      q = a * r_old[:, :L] + wk
      if p is None:                                   # window 0: no state to attend to
        h, r_prev = run(q, w), jnp.zeros((B, w, C))
      else:
        out = run(jnp.concatenate([p, q], axis=1), 0)
        r_prev, h = out[:, :w], out[:, w:]            # R_{k-1}, H_k
        outs.append(r_prev)
      p = a * r_prev[:, :L] + h                       # P_{k+1}
      r_old = r_prev
    outs.append(run(p, 0))                            # R_K, the last window
    x = jnp.concatenate(outs, axis=1)[:, :T]
  x = model.norm(x)
  return model.embed_tokens.attend(x)


def test_full_form_equals_the_papers_window_loop():
  m = model_with_alpha(tiny())
  t = toks(T=14)          # 3.5 windows: a partial last one
  ref = nnx.jit(paper_loop)(m, t)
  assert_rel(ref, _full(m, t), 2e-5, "scan form vs the paper's loop")


@pytest.mark.parametrize("mixing", ["add", "convex"])
def test_full_form_equals_token_by_token_decoding(mixing):
  m = model_with_alpha(tiny(mlp="lowrank", mlp_rank=8, mixing=mixing))
  t = toks(T=13)
  ref = _full(m, t)
  out, cache = _cached(m, t, m.init_cache(2), None)
  assert_rel(ref, out, 2e-5, "one cached call of 13 tokens")
  c, outs = m.init_cache(2), []
  for s in (slice(0, 6), slice(6, 7), slice(7, 13)):   # prefill, decode, prefill
    o, c = _cached(m, t[:, s], c, None)
    outs.append(o)
  assert_rel(ref, jnp.concatenate(outs, axis=1), 2e-5, "prefill + decode steps")
  np.testing.assert_array_equal(np.asarray(c["next_pos"]), [13, 13])
  # the state is the same size at any context length
  shapes = jax.tree.map(jnp.shape, m.init_cache(2, 10))
  assert jax.tree.map(jnp.shape, m.init_cache(2, 100_000)) == shapes == jax.tree.map(jnp.shape, c)


def test_left_padded_decode_equals_the_unpadded_rows():
  m = model_with_alpha(tiny(num_hidden_layers=1))
  t = toks(B=1, T=9)
  ref = _full(m, t)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), t], axis=1)
  seg = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 9), jnp.int32)], axis=1)
  out, c = _cached(m, padded, m.init_cache(1), seg)
  assert_rel(ref, out[:, 3:], 2e-5, "left padding skipped by the recurrent state")


def test_packed_documents_do_not_leak():
  m = model_with_alpha(tiny())
  t = toks(B=1, T=20)
  seg = jnp.asarray([[1] * 7 + [2] * 13], jnp.int32)        # doc 2 starts mid-window
  f = nnx.jit(lambda m, t, s: m(t, segment_ids=s)[0])
  base = f(m, t, seg)
  other = t.at[:, :7].set((t[:, :7] + 11) % 50)             # change document 1 only
  out = f(m, other, seg)
  np.testing.assert_allclose(np.asarray(base[:, 7:]), np.asarray(out[:, 7:]), atol=1e-6)
  assert np.abs(np.asarray(base[:, :7] - out[:, :7])).max() > 1e-3   # doc 1 itself changed
  # and without segment ids, the same change does reach document 2
  assert np.abs(np.asarray(_full(m, t)[:, 7:] - _full(m, other)[:, 7:])).max() > 1e-4


@pytest.mark.parametrize("mixing,alpha", [("add", 0.5), ("convex", 0.9)])
def test_gradients_finite_and_reach_the_first_window_over_long_sequences(mixing, alpha):
  cfg = tiny(num_hidden_layers=1, window=16, alpha_init=alpha, mixing=mixing)
  m = RecurrentTransformer(cfg, rngs=nnx.Rngs(0))
  T = 2048
  t = np.random.RandomState(0).randint(10, 50, (1, T))
  t[0, :16] = 5                      # token 5 appears only in the first window
  t = jnp.asarray(t, jnp.int32)

  def loss(m):
    logits = m(t)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, -64:-1], t[:, -63:]).mean()

  g = nnx.jit(nnx.grad(loss))(m)
  leaves = jax.tree.leaves(nnx.state(g, nnx.Param))
  assert all(bool(jnp.isfinite(x).all()) for x in leaves)
  emb = np.asarray(g.embed_tokens.embedding[...])
  # the loss on the last 63 tokens depends on the first window through 127 steps of state
  assert np.abs(emb[5]).max() > 0 and np.isfinite(emb).all()
  assert abs(float(g.layers[0].alpha_logit[...])) > 0


def test_copy_task_is_learned_through_the_state():
  """Copy 4 symbols after a gap of 8: the answer is 13 positions after the symbol, beyond
  the 2w = 8 positions one step attends to, so it can only come through the carried state."""
  K, GAP = 4, 8
  cfg = RecurrentTransformerConfig(vocab_size=12, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=2, window=4)
  m = RecurrentTransformer(cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(m, optax.adam(3e-3), wrt=nnx.Param)
  ans = slice(K + GAP, 2 * K + GAP)

  def batch(rng, n):
    sym = rng.randint(3, 11, (n, K))
    return jnp.asarray(np.concatenate([sym, np.ones((n, GAP), int), np.full((n, 1), 2), sym], 1),
                       jnp.int32)

  @nnx.jit
  def step(m, opt, x):
    def lossf(m):
      logits = m(x[:, :-1])[0][:, ans]
      return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:][:, ans]).mean()
    loss, g = nnx.value_and_grad(lossf)(m)
    opt.update(m, g)
    return loss

  rng = np.random.RandomState(0)
  for _ in range(150):
    step(m, opt, batch(rng, 32))
  test = batch(np.random.RandomState(1), 256)
  pred = jnp.argmax(_full(m, test[:, :-1])[:, ans], -1)
  acc = float((pred == test[:, 1:][:, ans]).mean())
  assert acc > 0.95, acc            # chance: 1/8


def test_save_load_round_trip(tmp_path):
  from linjax.convert import save_linjax
  m = model_with_alpha(tiny(num_hidden_layers=1, mixing="convex"))
  save_linjax(m, tmp_path / "rt")
  back, tok = linjax.from_pretrained(tmp_path / "rt")
  assert isinstance(back, RecurrentTransformer) and tok is None
  assert back.config == m.config
  t = toks()
  np.testing.assert_array_equal(np.asarray(_full(m, t)), np.asarray(_full(back, t)))


@pytest.mark.parametrize("kw,field", [
    (dict(window=0), "window"), (dict(window=-3), "window"), (dict(window=2.5), "window"),
    (dict(alpha_init=1.0), "alpha_init"), (dict(alpha_init=0.0), "alpha_init"),
    (dict(num_hidden_layers=0), "num_hidden_layers"), (dict(mixing="mul"), "mixing"),
])
def test_bad_configs_name_the_field(kw, field):
  with pytest.raises(RecurrentTransformerConfigError, match=f"'{field}'"):
    tiny(**kw)


def test_bad_ffn_config_names_the_field():
  with pytest.raises(ValueError, match="'mlp_rank'"):
    tiny(mlp="lowrank", mlp_rank=64)      # > min(hidden, intermediate) = 32
