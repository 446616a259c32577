"""linjax.evaluate (the suite), its table and plot, and the `linjax eval` CLI."""
import json
import os
import re

import numpy as np
import pytest

from linjax.eval import recall, suite as suite_mod


class WordTokenizer:
  """Word-level test tokenizer: ' word' and punctuation are one token each."""
  eos_token_id = 1
  bos_token_id = None

  def __init__(self, vocab_size=512):
    self.V = vocab_size
    self.vocab = {}
    for w in recall._KEY_WORDS + recall._VALUE_WORDS:
      self._id(" " + w)

  def _id(self, piece):
    if piece not in self.vocab:
      n = len(self.vocab) + 2
      self.vocab[piece] = n if n < self.V else 2 + hash(piece) % (self.V - 2)
    return self.vocab[piece]

  def encode(self, text, add_special_tokens=False):
    return [self._id(p) for p in re.findall(r"\s*\w+|\s*[^\w\s]", text)]


def tiny_llama(seed=0, V=512):
  from flax import nnx
  from linjax.models.llama import Llama, LlamaConfig
  cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=1024)
  return Llama(cfg, rngs=nnx.Rngs(seed))


def test_evaluate_tiny_suite_on_tiny_llama():
  tok = WordTokenizer()
  student, teacher = tiny_llama(0), tiny_llama(1)
  r = suite_mod.evaluate(student, tokenizer=tok, teacher=teacher, suite="tiny")
  s = suite_mod.SUITES["tiny"]
  assert r["ppl_tokens"] == s.ppl_windows * (s.ppl_seq_len - 1)
  assert np.isfinite(r["perplexity"]) and r["perplexity"] > 1
  assert abs(np.log(r["perplexity"]) - r["nll"]) < 1e-6
  assert 0 <= r["top1_agreement"] <= 1
  assert set(r["mqar"]) == set(r["passkey"]) == set(s.context_lens)
  # A random tiny model does not recall: MQAR near chance, passkey 0.
  assert all(0 <= v < 0.5 for v in r["mqar"].values())
  assert all(v == 0 for v in r["passkey"].values())
  # top-1 agreement: the argmaxes of both models on the held-out windows, counted here
  toks = suite_mod.heldout_tokens(tok, s.ppl_seq_len * s.ppl_windows).reshape(
      s.ppl_windows, s.ppl_seq_len)
  a = np.asarray(student(toks)[0]).argmax(-1)
  b = np.asarray(teacher(toks)[0]).argmax(-1)
  assert r["top1_agreement"] == pytest.approx(float((a == b).mean()))
  with pytest.raises(ValueError, match="unknown suite"):
    suite_mod.evaluate(student, tokenizer=tok, suite="huge")


def test_recall_batches_use_heldout_filler_and_fit():
  tok = WordTokenizer()
  b = suite_mod.recall_batches(tok, "tiny")
  for L in suite_mod.SUITES["tiny"].context_lens:
    assert b["mqar"][L].tokens.shape[1] == L and b["passkey"][L].tokens.shape[1] == L
  # MQAR's filler is validation text, never the scored held-out split
  from linjax.data.streams import heldout_tokens
  filler = set(heldout_tokens(tok, 2048, split="val").tolist())
  used = set(b["mqar"][max(b["mqar"])].tokens.ravel().tolist())
  assert len(used & filler) > 50


def test_table_and_plot(tmp_path):
  res = {"teacher": {"perplexity": 10.0, "mqar": {128: 1.0, 256: 0.9},
                     "passkey": {128: 1.0, 256: 1.0}},
         "student": {"perplexity": 12.5, "ppl_ratio": 1.25, "top1_agreement": 0.81,
                     "top1_ci": (0.79, 0.83), "kl": 0.2, "kl_ci": (0.15, 0.25),
                     "mqar": {128: 0.5, 256: 0.25}, "passkey": {128: 1.0}}}
  t = suite_mod.results_table(res)
  lines = t.splitlines()
  assert lines[0] == ("| model | perplexity | ratio | top-1 agr. (95% CI) | KL (95% CI) | "
                      "MQAR@128 | MQAR@256 | passkey@128 | passkey@256 |")
  assert lines[2] == "| teacher | 10.00 | - | - | - | 1.00 | 0.90 | 1.00 | 1.00 |"
  assert lines[3] == ("| student | 12.50 | 1.250 | 0.810 (0.790-0.830) | 0.200 (0.150-0.250) | "
                      "0.50 | 0.25 | 1.00 | - |")
  p = suite_mod.plot_recall(res, str(tmp_path / "r.png"))
  assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli(tmp_path, monkeypatch, capsys):
  import linjax
  tok = WordTokenizer()
  models = {"a": tiny_llama(0), "t": tiny_llama(1)}
  monkeypatch.setattr(linjax, "from_pretrained",
                      lambda path, dtype=None: (models[os.path.basename(path)], tok),
                      raising=False)
  from linjax.eval.cli import main
  out = tmp_path / "out"
  assert main(["--model", "ckpts/a", "--teacher", "ckpts/t", "--suite", "tiny",
               "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "| teacher |" in printed and "| a |" in printed
  assert (out / "recall.png").exists() and (out / "results.md").exists()
  res = json.loads((out / "results.json").read_text())
  assert res["teacher"].get("top1_agreement") is None
  assert 0 <= res["a"]["top1_agreement"] <= 1
