"""Token streams from the embedded corpus: what evaluation scores and synthetic tasks fill with.

  heldout_tokens(tokenizer, n)   the first n tokens of the held-out split, documents joined
                                 by EOS (raises if the split is shorter)
  token_stream(tokenizer, n, split="train", seed=0)
                                 at least n tokens of shuffled documents of a split, joined
                                 by EOS
"""
from __future__ import annotations

import numpy as np

from linjax.data.corpus import embedded_corpus


def encode(tokenizer, text: str) -> list[int]:
  if hasattr(tokenizer, "encode"):
    try:
      return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
      return list(tokenizer.encode(text))
  return list(tokenizer(text)["input_ids"])


def _join(tokenizer, docs, n, order=None):
  eos = getattr(tokenizer, "eos_token_id", None)
  out: list[int] = []
  for i in (range(len(docs)) if order is None else order):
    out += encode(tokenizer, docs[i]["text"])
    if eos is not None:
      out.append(int(eos))
    if len(out) >= n:
      return np.asarray(out[:n], np.int32)
  return np.asarray(out, np.int32)


def heldout_tokens(tokenizer, n_tokens: int, split: str = "heldout") -> np.ndarray:
  """The first `n_tokens` tokens of the held-out documents (in their fixed order)."""
  out = _join(tokenizer, embedded_corpus(split), n_tokens)
  if len(out) < n_tokens:
    raise ValueError(f"the {split!r} split has {len(out)} tokens, fewer than {n_tokens}")
  return out


def token_stream(tokenizer, n_tokens: int, *, split: str = "train", seed: int = 0) -> np.ndarray:
  """At least `n_tokens` tokens of the split's documents in a seeded order, joined by EOS."""
  docs = embedded_corpus(split)
  order = np.random.default_rng(seed).permutation(len(docs))
  out = _join(tokenizer, docs, n_tokens, order)
  if len(out) < n_tokens:
    raise ValueError(f"corpus split {split!r} has only {len(out)} tokens, need {n_tokens}")
  return out
