"""In-context recall probes: multi-query associative recall (MQAR) and passkey retrieval.

SUPRA's finding is that linearized models lose in-context recall first; these probes
measure it at a controllable context length, on the model itself.

Both generators return a `RecallBatch`: token rows of one length plus, for each row, the
positions whose next-token logits must predict the answer tokens. Scoring is teacher-forced
(one forward pass): an example counts as correct when the argmax at every answer position
is the answer token. For a passkey that is exactly "greedy decoding emits the passkey"
(greedy decoding follows the argmax, so it reproduces the answer iff every argmax on the
answer path is right), without running a decode loop.

  MQAR (Zoology, Arora et al. 2023), one row of `context_len` tokens:
    k1 v1 [sep] k2 v2 [sep] ... kn vn [sep] | filler ... | q1 a1 [sep] q2 a2 [sep] ...
  where each q is one of the keys and a its value; the logits at q predict a.
  Passkey (Mohtashami & Jaggi 2023): an instruction, filler text, "The pass key is N.
  Remember it. N is the pass key." at a relative `depth` of the filler, more filler, and
  "What is the pass key? The pass key is" followed by N.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from linjax.eval.metrics import argmax_fn


class RecallBatch(NamedTuple):
  tokens: np.ndarray       # [N, T] int32
  answer_pos: np.ndarray   # [N, A] int32: logits at these positions predict the answers
  answers: np.ndarray      # [N, A] int32
  answer_mask: np.ndarray  # [N, A] bool: which of the A slots are used (ragged answers)
  groups: np.ndarray       # [N, A] int32: answer slots of one item (a query, a passkey)
                           # share a group id; an item is right iff all its slots are


# ----------------------------------------------------------------------------- tokenizers

def encode(tokenizer, text: str) -> list[int]:
  """Token ids of `text` without special tokens (HF tokenizers and simple callables)."""
  try:
    return list(tokenizer.encode(text, add_special_tokens=False))
  except TypeError:
    return list(tokenizer.encode(text))


_KEY_WORDS = """apple river horse table window garden candle mountain pencil rabbit
  bridge castle dragon forest guitar hammer island jacket kettle ladder mirror needle
  orange palace pepper rocket saddle tiger violin wagon basket button camera carpet cherry
  dolphin engine feather finger helmet lemon magnet monkey pillow planet puppet ribbon
  rocket salmon shovel spider spoon statue tomato tunnel turtle wallet wizard yogurt
  anchor barrel cactus donkey falcon goblet""".split()
_VALUE_WORDS = """red blue green yellow purple black white brown silver golden pink gray
  north south east west one two three four five six seven eight nine ten hot cold big
  small fast slow old new happy sad bright dark soft loud sweet sour early late high low
  left right open closed empty full rich poor wet dry young calm wild""".split()


def word_pools(tokenizer, *, prefix: str = " "):
  """Key and value token pools for MQAR on a pretrained tokenizer: English words that are
  one token each (with a leading space), keys and values disjoint.
  Returns (key_ids, value_ids) as int32 arrays; raises ValueError if fewer than 8 each."""
  def single(words):
    ids = []
    for w in dict.fromkeys(words):
      t = encode(tokenizer, prefix + w)
      if len(t) == 1 and t[0] not in ids:
        ids.append(t[0])
    return ids
  keys, values = single(_KEY_WORDS), single(_VALUE_WORDS)
  values = [v for v in values if v not in keys]
  if len(keys) < 8 or len(values) < 8:
    raise ValueError(f"tokenizer has too few single-token words ({len(keys)} keys, "
                     f"{len(values)} values)")
  return np.asarray(keys, np.int32), np.asarray(values, np.int32)


# ----------------------------------------------------------------------------- MQAR

def make_mqar(*, num_examples: int, context_len: int, num_pairs: int,
              key_ids: Sequence[int], value_ids: Sequence[int], num_queries: int | None = None,
              sep_id: int | None = None, filler_ids: Sequence[int] | None = None,
              seed: int = 0) -> RecallBatch:
  """Multi-query associative recall rows of exactly `context_len` tokens.

  Args:
    num_pairs: distinct key-value pairs written at the start of each row (keys sampled
      without replacement from `key_ids`, values with replacement from `value_ids`).
    num_queries: keys asked again at the end (default `num_pairs`), in a random order.
    sep_id: optional token written after each pair and each answer (e.g. ",").
    filler_ids: a token stream; a random slice of it fills the gap between the pairs and
      the queries (default: random tokens not in the key or value pools, drawn from
      0..max(pools)).
  Raises ValueError if the pairs and queries do not fit in `context_len` or the pools are
    too small.
  """
  rng = np.random.default_rng(seed)
  key_ids = np.asarray(key_ids, np.int32)
  value_ids = np.asarray(value_ids, np.int32)
  nq = num_pairs if num_queries is None else num_queries
  if num_pairs > len(key_ids) or nq > num_pairs:
    raise ValueError(f"need num_queries <= num_pairs <= {len(key_ids)} keys, got "
                     f"{nq} queries, {num_pairs} pairs")
  w = 2 + (sep_id is not None)
  gap = context_len - w * (num_pairs + nq)
  if gap < 0:
    raise ValueError(f"{num_pairs} pairs and {nq} queries need {w * (num_pairs + nq)} "
                     f"tokens, more than context_len={context_len}")
  if filler_ids is None:
    pool = np.setdiff1d(np.arange(int(max(key_ids.max(), value_ids.max())) + 1),
                        np.concatenate([key_ids, value_ids])).astype(np.int32)
  else:
    filler_ids = np.asarray(filler_ids, np.int32)
    if gap and len(filler_ids) < gap:
      filler_ids = np.tile(filler_ids, gap // len(filler_ids) + 1)

  tokens = np.zeros((num_examples, context_len), np.int32)
  pos = np.zeros((num_examples, nq), np.int32)
  ans = np.zeros((num_examples, nq), np.int32)
  for n in range(num_examples):
    keys = rng.choice(key_ids, num_pairs, replace=False)
    vals = rng.choice(value_ids, num_pairs, replace=True)
    row = []
    for k, v in zip(keys, vals):
      row += [k, v] + ([sep_id] if sep_id is not None else [])
    if filler_ids is None:
      row += list(rng.choice(pool, gap))
    else:
      s = int(rng.integers(0, len(filler_ids) - gap + 1))
      row += list(filler_ids[s:s + gap])
    for i, q in enumerate(rng.permutation(num_pairs)[:nq]):
      pos[n, i] = len(row)
      ans[n, i] = vals[q]
      row += [keys[q], vals[q]] + ([sep_id] if sep_id is not None else [])
    tokens[n] = row
  ones = np.ones_like(pos, bool)
  return RecallBatch(tokens, pos, ans, ones, np.broadcast_to(np.arange(nq), pos.shape).copy())


# ----------------------------------------------------------------------------- passkey

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                 "and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There "
                  "and back again.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def make_passkey(tokenizer, *, num_examples: int, context_len: int,
                 depths: Sequence[float] | float = (0.1, 0.5, 0.9), digits: int = 5,
                 filler: str | Sequence[int] | None = None, seed: int = 0) -> RecallBatch:
  """Passkey retrieval rows of exactly `context_len` tokens.

  Args:
    tokenizer: anything with `encode(text)` (HF tokenizers: special tokens are not added).
    depths: relative position(s) in [0, 1] of the needle inside the filler; example i uses
      depths[i % len(depths)].
    digits: length of the random passkey (a number without a leading zero).
    filler: filler text (repeated as needed) or a token stream to cut from (e.g. the
      embedded corpus); default the classic "The grass is green..." sentences.
  Raises ValueError if `context_len` is too short for the intro, needle and question.
  """
  rng = np.random.default_rng(seed)
  depths = [depths] if np.isscalar(depths) else list(depths)
  intro = encode(tokenizer, PASSKEY_INTRO)
  question = encode(tokenizer, PASSKEY_QUESTION)
  if filler is None or isinstance(filler, str):
    unit = encode(tokenizer, " " + (filler or PASSKEY_FILLER))
    stream = np.asarray(unit * (context_len // max(len(unit), 1) + 2), np.int32)
    random_start = False
  else:
    stream = np.asarray(filler, np.int32)
    random_start = True
  rows, poss, answers = [], [], []
  for n in range(num_examples):
    key = int(rng.integers(10 ** (digits - 1), 10 ** digits))
    needle = encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
    answer = encode(tokenizer, f" {key}")
    gap = context_len - len(intro) - len(needle) - len(question) - len(answer)
    if gap < 0:
      raise ValueError(f"context_len={context_len} is shorter than the passkey template "
                       f"({context_len - gap} tokens)")
    if len(stream) < gap:
      stream = np.tile(stream, gap // len(stream) + 1)
    s = int(rng.integers(0, len(stream) - gap + 1)) if random_start else 0
    fill = list(stream[s:s + gap])
    a = int(round(depths[n % len(depths)] * gap))
    row = intro + fill[:a] + needle + fill[a:] + question
    poss.append(np.arange(len(row) - 1, len(row) - 1 + len(answer)))
    answers.append(answer)
    rows.append(row + answer)
  A = max(len(a) for a in answers)
  pos = np.zeros((num_examples, A), np.int32)
  ans = np.zeros((num_examples, A), np.int32)
  mask = np.zeros((num_examples, A), bool)
  for n, (p, a) in enumerate(zip(poss, answers)):
    pos[n, :len(a)], ans[n, :len(a)], mask[n, :len(a)] = p, a, True
  return RecallBatch(np.asarray(rows, np.int32), pos, ans, mask, np.zeros_like(pos))


# ----------------------------------------------------------------------------- scoring

def recall_accuracy(model, batch: RecallBatch, *, batch_size: int = 4,
                    per_example: bool = False):
  """Teacher-forced recall accuracy of `model` on a `RecallBatch`.

  An item (an MQAR query; a whole passkey) is correct when the argmax next-token logits at
  all of its answer positions equal its answer tokens. Returns the mean over items (a float
  in [0, 1]), or with `per_example=True` a bool array [N, items].
  """
  argmax = argmax_fn(model)
  N, T = batch.tokens.shape
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (batch_size, T))
  preds = np.zeros_like(batch.answers)
  for s in range(0, N, batch_size):
    tok = np.zeros((batch_size, T), np.int32)
    seg = np.zeros((batch_size, T), np.int32)
    n = min(batch_size, N - s)
    tok[:n], seg[:n] = batch.tokens[s:s + n], 1
    am = np.asarray(argmax(tok, pos, seg))
    preds[s:s + n] = np.take_along_axis(am[:n], batch.answer_pos[s:s + n], axis=1)
  hit = (preds == batch.answers) | ~batch.answer_mask
  G = int(batch.groups.max()) + 1
  items = np.ones((N, G), bool)
  used = np.zeros((N, G), bool)
  for g in range(G):
    sel = batch.groups == g
    items[:, g] = np.all(np.where(sel, hit, True), axis=1)
    used[:, g] = np.any(sel & batch.answer_mask, axis=1)
  if per_example:
    return items
  return float(items[used].mean())


def recall_sweep(models: dict, make_batch, context_lens: Sequence[int], *,
                 batch_size: int = 4) -> dict:
  """Accuracy of each model at each context length on the same generated rows.

  make_batch(context_len) -> RecallBatch. Returns {model_name: {context_len: acc}}.
  """
  out = {name: {} for name in models}
  for L in context_lens:
    b = make_batch(L)
    for name, m in models.items():
      out[name][int(L)] = recall_accuracy(m, b, batch_size=batch_size)
  return out
