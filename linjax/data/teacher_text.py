"""Teacher-generated training text: continuations sampled from the teacher, seeded and cached.

    docs = generate_corpus(teacher, tokenizer, n_tokens=65536, cache_key="smollm2", seed=0)

Prompts are the first `prompt_tokens` tokens of training documents (the embedded "train"
split, a seeded order); each continuation of `new_tokens` tokens is sampled at
`temperature` / `top_p` with `linjax.generate`, `batch_size` prompts at a time. The
documents (prompt + continuation, as text) are decontaminated against the held-out split
like the corpus itself (the teacher may have memorised held-out passages), then cached as
jsonl under the corpus cache, keyed by `cache_key` and every setting, so a second run reads
them back. Progress is shown with tqdm. In a multi-process run every process takes part in
sampling (the teacher is one sharded model); only process 0 prints and shows progress.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np


def _path(cache_key: str, settings: dict) -> str:
  from linjax.data.corpus import cache_dir, python_tag
  h = hashlib.sha256(json.dumps({"key": cache_key, **settings}, sort_keys=True).encode())
  return os.path.join(cache_dir(), f"teacher_text_{python_tag()}_{h.hexdigest()[:16]}.jsonl")


def generate_corpus(teacher, tokenizer, *, n_tokens: int, cache_key: str, seed: int = 0,
                    prompt_tokens: int = 32, new_tokens: int = 256, temperature: float = 0.8,
                    top_p: float = 0.95, batch_size: int = 8, progress: bool = True) -> list[dict]:
  """About `n_tokens` tokens of teacher text as documents {"id", "text"} (cached)."""
  from linjax.data import ngrams
  from linjax.data.corpus import (decontamination_units, embedded_corpus, NGRAM, read_jsonl,
                                  write_jsonl)
  from linjax.data.streams import encode
  settings = dict(n_tokens=int(n_tokens), seed=int(seed), prompt_tokens=int(prompt_tokens),
                  new_tokens=int(new_tokens), temperature=float(temperature),
                  top_p=float(top_p))
  path = _path(cache_key, settings)
  if os.path.exists(path):
    return read_jsonl(path)
  from linjax.generate import generate
  docs = embedded_corpus("train")
  order = np.random.default_rng(seed).permutation(len(docs))
  n_rows = -(-int(n_tokens) // (prompt_tokens + new_tokens))
  prompts = []
  for i in order:
    ids = encode(tokenizer, docs[i]["text"])
    if len(ids) >= prompt_tokens:
      prompts.append(ids[:prompt_tokens])
    if len(prompts) == n_rows:
      break
  t0 = time.time()
  import jax
  main = jax.process_index() == 0

  def say(msg):
    if main:
      print(msg, file=sys.stderr, flush=True)
  say(f"teacher text: sampling {len(prompts)} continuations of {new_tokens} tokens, "
      f"{batch_size} at a time (cached in {path})")
  out = []
  it = range(0, len(prompts), batch_size)
  if progress and main:
    from tqdm.auto import tqdm
    it = tqdm(it, desc="teacher text", unit="batch")
  for s in it:
    batch = prompts[s:s + batch_size]
    if len(batch) < batch_size:           # one compiled shape: pad the last batch
      batch = batch + [batch[0]] * (batch_size - len(batch))
    new = generate(teacher, batch, max_new_tokens=new_tokens, temperature=temperature,
                   top_p=top_p, seed=seed + s, eos_token_id=getattr(tokenizer, "eos_token_id", None))
    for j in range(min(batch_size, len(prompts) - s)):
      text = tokenizer.decode(list(prompts[s + j]) + list(new[j]), skip_special_tokens=True)
      out.append({"id": f"teacher:{seed}:{s + j}", "text": text})
  units, _ = decontamination_units()
  out, _ = ngrams.decontaminate(out, embedded_corpus("heldout"), NGRAM, units)
  write_jsonl(out, path)
  say(f"teacher text: {len(out)} documents in {time.time() - t0:.0f} s")
  return out
