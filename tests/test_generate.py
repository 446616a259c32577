"""Generation: batched left-padded == one prompt at a time == transformers greedy; sampling."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_llama_common import hf_model, linjax_model, torch
from linjax.generate import generate, left_pad, sample_logits

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]
NAME = "gqa_llama3_bias"


@pytest.fixture(scope="module")
def batched():
  return generate(linjax_model(NAME), PROMPTS, max_new_tokens=10)


def test_greedy_equals_transformers_and_single_prompts(batched):
  tm = hf_model(NAME)
  for p, got in zip(PROMPTS, batched):
    ref = tm.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(p):].tolist()
    assert got == ref
  # one prompt alone gives the same tokens as inside the padded batch
  assert generate(linjax_model(NAME), PROMPTS[1], max_new_tokens=10) == batched[1]
  # a chunked prefill changes nothing
  assert generate(linjax_model(NAME), PROMPTS, max_new_tokens=10, prefill_chunk=3) == batched


def test_eos_stops_each_row_and_streams(batched):
  eos = batched[1][3]
  seen = []
  out = generate(linjax_model(NAME), PROMPTS, max_new_tokens=10, eos_token_id=eos,
                 callback=lambda t, a: seen.append((t.copy(), a.copy())))
  for row, full in zip(out, batched):
    cut = full.index(eos) + 1 if eos in full else len(full)
    assert row == full[:cut]
  assert len(seen) == max(len(r) for r in out)
  streamed = [[int(t[b]) for t, a in seen if a[b]] for b in range(3)]
  assert streamed == out


def test_sampling_is_seeded_and_top_p_restricts():
  model = linjax_model(NAME)
  a = generate(model, PROMPTS, max_new_tokens=6, temperature=0.9, top_p=0.8, seed=1)
  b = generate(model, PROMPTS, max_new_tokens=6, temperature=0.9, top_p=0.8, seed=1)
  c = generate(model, PROMPTS, max_new_tokens=6, temperature=0.9, top_p=0.8, seed=2)
  assert a == b and a != c
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  picks = np.concatenate([np.asarray(sample_logits(logits, k, temperature=1.0, top_p=0.7))
                          for k in keys])
  assert set(picks) == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2, 3 are cut
  picks = np.asarray(sample_logits(logits, keys[0], temperature=1.0, top_p=1.0))
  assert set(picks) == {0, 1, 2, 3}


def test_left_pad_layout():
  toks, pos, seg = left_pad([[1, 2, 3], [4]], pad_token_id=9)
  np.testing.assert_array_equal(toks, [[1, 2, 3], [9, 9, 4]])
  np.testing.assert_array_equal(pos, [[0, 1, 2], [0, 0, 0]])
  np.testing.assert_array_equal(seg, [[1, 1, 1], [0, 0, 1]])
  with pytest.raises(ValueError, match="at least one token"):
    left_pad([[1], []])
