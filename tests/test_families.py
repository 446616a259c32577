"""Llama-family architectures beyond Llama (Mistral, Qwen2, Qwen3) against transformers'
own modeling code: import, logits, export back, and linearizing one."""
from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from linjax.convert import UnsupportedConfigError, from_pretrained, save_pretrained  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rope_theta=1000.0, tie_word_embeddings=False)
FAMILIES = {
    # every layer slides with an 8-token window: T = 24 tokens exercise it
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, head_dim=12)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False)),
    # sliding window on layers >= max_window_layers (transformers' layer_types)
    "qwen2_sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
}


def hf_model(name, seed=0):
  cfg_cls, model_cls, kw = FAMILIES[name]
  torch.manual_seed(seed)
  cfg = getattr(transformers, cfg_cls)(**COMMON, **kw, attn_implementation="eager")
  m = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():   # biases and norms off their zero / one init, so a dropped one shows
    for n, p in m.named_parameters():
      if n.endswith("bias") or "norm" in n:
        p.add_(0.2 * torch.randn_like(p))
  return m


def logits_torch(m, toks):
  with torch.no_grad():
    return m(torch.tensor(toks)).logits.float().numpy()


TOKS = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 24))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_matches_transformers_and_exports_back(name, tmp_path):
  m = hf_model(name)
  m.save_pretrained(tmp_path / "hf")
  model, _ = from_pretrained(str(tmp_path / "hf"), tokenizer=False)
  ref = logits_torch(m, TOKS)
  ours = np.asarray(model(jnp.asarray(TOKS))[0])
  assert np.abs(ours - ref).max() <= 2e-4, name
  assert model.config.model_type == name.split("_")[0]
  # greedy decoding (KV cache, the sliding window's ring where the family has one) gives
  # transformers' tokens, past the 8-token window
  from linjax.generate import generate
  prompt = [int(t) for t in TOKS[0, :6]]
  ref_ids = m.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
  assert generate(model, [prompt], max_new_tokens=14)[0] == ref_ids
  out = save_pretrained(model, tmp_path / "back")
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back).__name__ == FAMILIES[name][1]
  assert np.abs(logits_torch(back, TOKS) - ref).max() <= 1e-5


def test_sliding_window_matters(tmp_path):
  """The Mistral window is applied: with it dropped, logits past the window differ."""
  m = hf_model("mistral")
  m.save_pretrained(tmp_path)
  import linjax
  model, _ = from_pretrained(str(tmp_path), tokenizer=False)
  full, _ = from_pretrained(str(tmp_path), tokenizer=False, sliding_window=None)
  a = np.asarray(model(jnp.asarray(TOKS))[0])
  b = np.asarray(full(jnp.asarray(TOKS))[0])
  np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5)   # inside the window: the same
  assert np.abs(a[:, 12:] - b[:, 12:]).max() > 1e-3
  # linearizing keeps the teacher's own q/k path: a "softmax" student with the same window
  # equals the teacher
  st = linjax.linearize(model, "softmax", window=8)
  np.testing.assert_allclose(np.asarray(st(jnp.asarray(TOKS))[0]), a, atol=1e-5)


def test_qwen3_linearized_keeps_qk_norms(tmp_path):
  m = hf_model("qwen3")
  m.save_pretrained(tmp_path)
  import linjax
  model, _ = from_pretrained(str(tmp_path), tokenizer=False)
  st = linjax.linearize(model, "lolcats", window=64)   # window > T: exactly softmax
  ref = logits_torch(m, TOKS)
  assert np.abs(np.asarray(st(jnp.asarray(TOKS))[0]) - ref).max() <= 2e-4
  w = np.asarray(st.layers[0].self_attn.q_norm.weight[...])
  np.testing.assert_allclose(w, m.model.layers[0].self_attn.q_norm.weight.detach().numpy())


def test_unsupported_family_is_named(tmp_path):
  transformers.GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=16).save_pretrained(tmp_path)
  with pytest.raises(UnsupportedConfigError, match="model_type='gemma'"):
    from_pretrained(str(tmp_path), tokenizer=False)
