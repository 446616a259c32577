"""Perplexity and top-1 agreement against direct numpy / PyTorch computations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax.eval import perplexity, top1_agreement
from linjax.eval.metrics import sliding_windows

V = 17


class CountModel:
  """Causal fake LM: logits_t = table[x_t] + alpha * counts of each token in x_<=t.

  Context-dependent, so a wrong window or a shifted target changes the numbers."""

  def __init__(self, seed=0, alpha=0.3):
    self.table = np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32)
    self.alpha = alpha

  def __call__(self, tokens, positions=None, segment_ids=None):
    oh = jnp.asarray(np.eye(V, dtype=np.float32))[tokens]
    return jnp.asarray(self.table)[tokens] + self.alpha * jnp.cumsum(oh, axis=1)

  def numpy_logits(self, x):
    oh = np.eye(V, dtype=np.float64)[x]
    return self.table.astype(np.float64)[x] + self.alpha * np.cumsum(oh, axis=0)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def hf_guide_nll(logits_of, docs, seq_len, stride):
  """The loop of the `transformers` perplexity guide, with exact token sums."""
  total, count = 0.0, 0
  for doc in docs:
    prev_end = 0
    for begin in range(0, len(doc), stride):
      end = min(begin + seq_len, len(doc))
      trg_len = end - prev_end
      x = doc[begin:end]
      labels = x.copy()
      labels[:-trg_len] = -100
      logp = _log_softmax(logits_of(x))
      for i in range(len(x) - 1):
        if labels[i + 1] != -100:
          total -= logp[i, labels[i + 1]]
          count += 1
      prev_end = end
      if end == len(doc):
        break
  return total / count, count


def _docs(seed=1, lengths=(50, 7, 33, 2, 64)):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, V, size=n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("seq_len,stride", [(16, None), (16, 4), (16, 15), (64, None), (9, 3)])
def test_perplexity_matches_hf_guide_loop(seq_len, stride):
  m = CountModel()
  docs = _docs()
  ref, n = hf_guide_nll(m.numpy_logits, docs, seq_len, stride or seq_len)
  out = perplexity(m, docs, seq_len=seq_len, batch_size=3, stride=stride)
  assert out.num_tokens == n
  assert abs(out.nll - ref) < 1e-5
  assert abs(float(out) - math.exp(ref)) < 1e-4 * math.exp(ref)


def test_windows_score_each_token_at_most_once():
  docs = _docs(lengths=(100,))
  for stride in (1, 5, 16):
    ws = sliding_windows(docs, 16, stride)
    scored = [w.begin + j for w in ws for j in range(w.first_target, len(w.tokens))]
    assert len(scored) == len(set(scored))
    assert scored == sorted(scored) and scored[-1] == 99
    # with stride s every scored token has >= 16 - s tokens of context (or all before it)
    for w in ws:
      assert w.first_target >= min(16 - stride, w.begin + w.first_target) or w.begin == 0


def test_perplexity_dataset_and_array_inputs():
  datasets = pytest.importorskip("datasets")
  m = CountModel(seed=3)
  docs = _docs(seed=4, lengths=(40, 40, 40))
  a = perplexity(m, docs, seq_len=20, batch_size=2)
  b = perplexity(m, np.stack(docs), seq_len=20, batch_size=2)
  c = perplexity(m, datasets.Dataset.from_dict({"input_ids": [d.tolist() for d in docs]}),
                 seq_len=20, batch_size=2)
  assert a == b
  assert abs(a.nll - c.nll) < 1e-6 and a.num_tokens == c.num_tokens
  with pytest.raises(ValueError, match="input_ids"):
    perplexity(m, datasets.Dataset.from_dict({"text": ["a"]}), seq_len=8)
  with pytest.raises(ValueError):
    perplexity(m, [], seq_len=8)
  with pytest.raises(ValueError, match="stride"):
    perplexity(m, docs, seq_len=8, stride=9)


def test_padding_does_not_change_scores():
  # Same documents, batched 1 at a time (no padding rows) vs 4 at a time (padded rows).
  m = CountModel(seed=5)
  docs = _docs(seed=6, lengths=(30, 3, 17))
  a = perplexity(m, docs, seq_len=32, batch_size=1)
  b = perplexity(m, docs, seq_len=32, batch_size=4)
  assert a.num_tokens == b.num_tokens == 29 + 2 + 16
  assert abs(a.nll - b.nll) < 1e-6


def test_top1_agreement_direct():
  t = CountModel(seed=7, alpha=0.0)
  s = CountModel(seed=7, alpha=0.0)
  docs = _docs(seed=8, lengths=(25, 40))
  assert top1_agreement(s, t, docs) == 1.0
  # Change the student's answer for three token ids: agreement drops by their frequency.
  s.table = s.table.copy()
  changed = [0, 5, 9]
  for r in changed:
    s.table[r] = np.roll(s.table[r], 1)
  all_tok = np.concatenate(docs)
  keep = ~np.isin(all_tok, changed)
  argmax_t = t.table.argmax(-1)[all_tok]
  argmax_s = s.table.argmax(-1)[all_tok]
  expected = float(np.mean(argmax_t == argmax_s))
  assert expected < 1.0 and np.all((argmax_t == argmax_s)[keep])
  assert top1_agreement(s, t, docs, seq_len=16, batch_size=3) == pytest.approx(expected)


def _tiny_hf_llama(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=False)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.save_pretrained(tmp_path)
  return torch, hf


def test_perplexity_matches_transformers_loss(tmp_path):
  """A tiny random Llama: linjax perplexity == exp(transformers' own loss) on windows."""
  torch, hf = _tiny_hf_llama(tmp_path)
  import linjax
  model, _ = linjax.from_pretrained(str(tmp_path))
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 97, size=n) for n in (70, 40)]
  seq_len, stride = 32, 16
  total, count = 0.0, 0
  with torch.no_grad():
    for doc in docs:  # the transformers guide loop, with the model's own loss
      prev_end = 0
      for begin in range(0, len(doc), stride):
        end = min(begin + seq_len, len(doc))
        trg_len = end - prev_end
        x = torch.tensor(doc[begin:end])[None]
        labels = x.clone()
        labels[:, :-trg_len] = -100
        n = int((labels[:, 1:] != -100).sum())
        total += float(hf(x, labels=labels).loss) * n
        count += n
        prev_end = end
        if end == len(doc):
          break
  out = perplexity(model, docs, seq_len=seq_len, stride=stride, batch_size=2)
  assert out.num_tokens == count
  assert abs(out.nll - total / count) < 1e-4
  # and top-1 agreement of the converted model with the torch logits is total
  with torch.no_grad():
    ref = [hf(torch.tensor(d)[None]).logits[0].numpy() for d in docs]
  ours = [np.asarray(model(jnp.asarray(d)[None].astype(jnp.int32))[0])[0] for d in docs]
  assert max(np.abs(a - b).max() for a, b in zip(ref, ours)) < 1e-3
  # top-1 agreement of linjax with the torch model, against the argmaxes counted directly;
  # a teacher with its logits reordered agrees at the counted rate, not everywhere
  class TorchLM:
    def __init__(self, perm=None):
      self.perm = perm

    def _host(self, tokens):
      with torch.no_grad():   # padded rows: causal, so their padding changes nothing before it
        out = hf(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()
      return (out if self.perm is None else out[..., self.perm]).astype(np.float32)

    def __call__(self, tokens, positions=None, segment_ids=None):   # called under jit
      return jax.pure_callback(self._host, jax.ShapeDtypeStruct(tokens.shape + (97,),
                                                                jnp.float32), tokens)

  want = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ref, ours)]).mean()
  assert top1_agreement(model, TorchLM(), docs, batch_size=2) == pytest.approx(want)
  perm = np.roll(np.arange(97), 1)
  want = np.concatenate([a[:, perm].argmax(-1) == b.argmax(-1)
                         for a, b in zip(ref, ours)]).mean()
  assert want < 0.5
  assert top1_agreement(model, TorchLM(perm), docs, batch_size=2) == pytest.approx(want)
