"""MQAR and passkey generators (structure) and scorers (against hand-checkable fake models)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax.eval.recall import (make_mqar, make_passkey, recall_accuracy, recall_sweep,
                                word_pools)

V = 64
KEYS = np.arange(10, 30)
VALUES = np.arange(30, 50)


def oracle(tokens, positions=None, segment_ids=None):
  """Sees the future: its logits at t are one-hot on token t+1. Always right."""
  nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  return jax.nn.one_hot(nxt, 256)


def echo(tokens, positions=None, segment_ids=None):
  """Predicts the current token again: right only where a token repeats."""
  return jax.nn.one_hot(tokens, 256)


def induction(tokens, positions=None, segment_ids=None):
  """A perfect induction head: find the last earlier occurrence of x_t, predict what
  followed it. Solves MQAR exactly when filler never contains keys."""
  T = tokens.shape[1]
  t = jnp.arange(T)
  eq = (tokens[:, :, None] == tokens[:, None, :]) & (t[None, :] < t[:, None])[None]
  j = jnp.max(jnp.where(eq, t[None, None, :], -1), axis=-1)
  nxt = jnp.take_along_axis(tokens, jnp.clip(j + 1, 0, T - 1), axis=1)
  return jax.nn.one_hot(jnp.where(j >= 0, nxt, 0), 256)


def random_model(tokens, positions=None, segment_ids=None):
  key = jax.random.fold_in(jax.random.key(0), jnp.sum(tokens))
  return jax.random.normal(key, tokens.shape + (V,))


class CharTokenizer:
  """One token per character (ord)."""

  def encode(self, text, add_special_tokens=False):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("sep", [None, 3])
def test_mqar_structure(sep):
  b = make_mqar(num_examples=5, context_len=80, num_pairs=6, num_queries=4, key_ids=KEYS,
                value_ids=VALUES, sep_id=sep, seed=1)
  assert b.tokens.shape == (5, 80) and b.answers.shape == (5, 4)
  w = 2 if sep is None else 3
  for row, pos, ans in zip(b.tokens, b.answer_pos, b.answers):
    kv = row[:6 * w].reshape(6, w)
    pairs = dict(zip(kv[:, 0], kv[:, 1]))
    assert len(pairs) == 6 and set(kv[:, 0]) <= set(KEYS) and set(kv[:, 1]) <= set(VALUES)
    if sep is not None:
      assert (kv[:, 2] == sep).all()
    filler = row[6 * w:80 - 4 * w]
    assert not np.isin(filler, np.concatenate([KEYS, VALUES])).any()
    assert len(set(row[pos])) == 4                  # distinct keys queried
    for p, a in zip(pos, ans):
      assert pairs[row[p]] == a and row[p + 1] == a  # the answer follows its key
    assert pos[-1] == 80 - w                         # the last query ends the row
  with pytest.raises(ValueError, match="context_len"):
    make_mqar(num_examples=1, context_len=10, num_pairs=6, key_ids=KEYS, value_ids=VALUES)


def test_mqar_filler_stream():
  stream = np.arange(100, 200)
  b = make_mqar(num_examples=3, context_len=64, num_pairs=4, key_ids=KEYS, value_ids=VALUES,
                filler_ids=stream, seed=2)
  gap = b.tokens[:, 8:56]
  assert (np.diff(gap, axis=1) == 1).all()  # a contiguous slice of the stream


def test_mqar_scores_on_fake_models():
  b = make_mqar(num_examples=16, context_len=96, num_pairs=8, key_ids=KEYS, value_ids=VALUES,
                seed=3)
  assert recall_accuracy(oracle, b, batch_size=5) == 1.0
  assert recall_accuracy(induction, b, batch_size=5) == 1.0
  assert recall_accuracy(echo, b) == 0.0     # keys and values are disjoint
  assert recall_accuracy(random_model, b) < 0.1  # chance is 1/64
  per = recall_accuracy(oracle, b, per_example=True)
  assert per.shape == (16, 8) and per.all()


def test_passkey_structure_and_depth():
  tok = CharTokenizer()
  b = make_passkey(tok, num_examples=6, context_len=600, depths=[0.0, 0.5, 1.0], digits=5,
                   seed=4)
  assert b.tokens.shape == (6, 600)
  needle_at = []
  for row, pos, ans, m in zip(b.tokens, b.answer_pos, b.answers, b.answer_mask):
    text = tok.decode(row)
    key = tok.decode(ans[m])
    assert key.startswith(" ") and key[1:].isdigit() and len(key) == 6
    assert text.endswith("The pass key is" + key)
    assert f"The pass key is {key[1:]}. Remember it." in text
    assert tok.decode(row[pos[0] + 1:pos[-1] + 2]) == key   # logits at pos predict ans
    needle_at.append(text.index("The pass key is") / len(text))
  # depth 0 / 0.5 / 1: the needle moves from the start to the end of the filler
  assert needle_at[0] < 0.3 < needle_at[1] < 0.7 < needle_at[2]
  with pytest.raises(ValueError, match="shorter"):
    make_passkey(tok, num_examples=1, context_len=100)


def test_passkey_scores_on_fake_models():
  tok = CharTokenizer()
  b = make_passkey(tok, num_examples=8, context_len=400, seed=5,
                   filler=np.arange(200, 250))
  assert recall_accuracy(oracle, b, batch_size=3) == 1.0
  assert recall_accuracy(echo, b) == 0.0
  assert recall_accuracy(random_model, b) == 0.0
  # One wrong digit makes the whole passkey wrong.
  def one_off(tokens, positions=None, segment_ids=None):
    logits = oracle(tokens)
    last = b.answer_pos[:, -1:]
    return logits.at[:, int(last[0, 0])].set(0.0)
  per = recall_accuracy(one_off, b, per_example=True)
  assert per.shape == (8, 1) and not per.any()


def test_sweep_and_word_pools():
  out = recall_sweep({"oracle": oracle, "echo": echo},
                     lambda L: make_mqar(num_examples=4, context_len=L, num_pairs=4,
                                         key_ids=KEYS, value_ids=VALUES), [32, 64])
  assert out == {"oracle": {32: 1.0, 64: 1.0}, "echo": {32: 0.0, 64: 0.0}}

  class WordTok:  # one token per known word, several for anything else
    vocab = {}

    def encode(self, text, add_special_tokens=False):
      w = text.strip()
      if w in ("apple", "river", "horse") or len(w) <= 4:
        return [self.vocab.setdefault(w, len(self.vocab))]
      return [1, 2]
  with pytest.raises(ValueError, match="too few"):
    word_pools(WordTok())
