"""Shared pieces for the Llama / converter / generation tests: tiny random HF Llamas."""
from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96

# name -> transformers.LlamaConfig kwargs
CONFIGS = {
    # GQA, untied, llama3 rope scaling (positions past original_max), attention bias
    "gqa_llama3_bias": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=2, intermediate_size=96, attention_bias=True,
                            tie_word_embeddings=False,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16}),
    # no GQA, tied, linear rope scaling, mlp bias, head_dim != hidden / heads
    "mha_tied_linear": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                            head_dim=8, num_hidden_layers=2, intermediate_size=80,
                            mlp_bias=True, tie_word_embeddings=True, rope_theta=500.0,
                            rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def hf_config(name, **extra):
  kw = dict(vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5)
  kw.update(CONFIGS[name])
  kw.update(extra)
  return transformers.LlamaConfig(**kw)


@functools.cache
def hf_model(name):
  """A random tiny LlamaForCausalLM with every weight (norms, biases too) randomized."""
  torch.manual_seed(sum(map(ord, name)))
  m = transformers.LlamaForCausalLM(hf_config(name)).eval()
  with torch.no_grad():
    for n, p in m.named_parameters():
      if n.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return m


# cached across tests, so not under a test's tmp_path; removed when the process exits
_TMP = tempfile.TemporaryDirectory(prefix="linjax_tests_")


@functools.cache
def saved_hf_dir(name, how="safetensors"):
  """save_pretrained of `hf_model(name)`: how = safetensors | sharded | bin."""
  d = os.path.join(tempfile.mkdtemp(prefix=f"{name}_", dir=_TMP.name), how)
  m = hf_model(name)
  if how == "safetensors":
    m.save_pretrained(d)
  elif how == "sharded":
    m.save_pretrained(d, max_shard_size="20KB")
  elif how == "bin":
    os.makedirs(d)
    m.config.save_pretrained(d)
    torch.save(m.state_dict(), os.path.join(d, "pytorch_model.bin"))
  return d


def tokens(batch=2, length=40, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def torch_logits(model, toks):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(toks), dtype=torch.long)).logits.float().numpy()


@functools.cache
def linjax_model(name):
  from linjax.convert import from_pretrained
  return from_pretrained(saved_hf_dir(name), tokenizer=False)[0]


def make_word_tokenizer(out_dir):
  """A tiny word-level fast tokenizer over the VOCAB ids (w0 .. w{VOCAB-3}, <s>, </s>)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<s>": 1, "</s>": 2, "<unk>": 0}
  for i in range(3, VOCAB):
    vocab[f"w{i}"] = i
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>",
                                              pad_token="<unk>")
  fast.save_pretrained(out_dir)
  return fast
