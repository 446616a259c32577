"""N-gram overlap between texts, and the decontamination of training text against held-out text.

Units are words (`word_units`: lower-cased runs of letters and digits, so formatting and
punctuation do not hide a copy) or a tokenizer's tokens (`token_units`: the model's own
units; a 13-token span can be shorter than 13 words, e.g. a long number or a code fragment).
A unit function maps a text to (units, start character of each unit).

`decontaminate(docs, against, n, units)` drops every paragraph (blank-line separated) of
`docs` that takes part in an n-gram, in any of the units, that also occurs in `against`.
Each document is encoded whole, so n-grams running across paragraph boundaries count, and
the check is repeated on the rejoined document until it is clean (dropping a paragraph joins
its neighbours).
"""
from __future__ import annotations

import bisect
import re

_WORD = re.compile(r"[a-z0-9]+")
SEP = "\n\n"


def word_units(text: str):
  ms = list(_WORD.finditer(text.lower()))
  return [m.group(0) for m in ms], [m.start() for m in ms]


def token_units(tokenizer):
  """A unit function from an HF tokenizer (token ids and their character offsets)."""
  def units(text: str):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]
  return units


def ngram_set(units, n: int) -> set:
  return {tuple(units[i:i + n]) for i in range(len(units) - n + 1)}


def decontaminate(docs: list[dict], against: list[dict], n: int = 13,
                  units=(word_units,)) -> tuple[list[dict], dict]:
  """`docs` without the paragraphs that share an n-gram with `against`.

  docs / against: lists of {"id", "text"}. units: unit functions (see module docstring).
  Returns (clean docs; documents left empty are dropped, {"paragraphs_dropped",
  "chars_dropped", "docs_dropped"}).
  """
  refs = [set().union(*(ngram_set(u(d["text"])[0], n) for d in against)) for u in units]
  out, dropped, chars, gone = [], 0, 0, 0
  for d in docs:
    paras = [p for p in d["text"].split(SEP) if p.strip()]
    while paras:
      text = SEP.join(paras)
      starts = [0]
      for p in paras[:-1]:
        starts.append(starts[-1] + len(p) + len(SEP))
      bad = set()
      for u, ref in zip(units, refs):
        ids, pos = u(text)
        owner = [bisect.bisect_right(starts, c) - 1 for c in pos]
        for i in range(len(ids) - n + 1):
          if tuple(ids[i:i + n]) in ref:
            bad.update(owner[i:i + n])
      if not bad:
        break
      dropped += len(bad)
      chars += sum(len(paras[j]) for j in bad)
      paras = [p for j, p in enumerate(paras) if j not in bad]
    if paras:
      out.append({"id": d["id"], "text": SEP.join(paras)})
    else:
      gone += 1
  return out, {"paragraphs_dropped": dropped, "chars_dropped": chars, "docs_dropped": gone}
