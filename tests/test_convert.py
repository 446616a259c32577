"""Converters: every import format, export back to transformers, named errors."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_llama_common import (CONFIGS, hf_model, linjax_model, saved_hf_dir, tokens,
                                     torch_logits, transformers)
from linjax.convert import (CheckpointMismatchError, UnsupportedConfigError,
                            UnsupportedExportError, UnsupportedFormatError, from_pretrained,
                            save_linjax, save_pretrained)
from linjax.convert import mapping
from linjax.models.llama import Llama, LlamaConfig


def _maxdiff(model, ref, toks):
  return float(np.abs(np.asarray(model(jnp.asarray(toks))[0]) - ref).max())


@pytest.mark.parametrize("how", ["sharded", "bin"])
def test_import_formats(how):
  name = "gqa_llama3_bias" if how == "sharded" else "mha_tied_linear"
  d = saved_hf_dir(name, how)
  if how == "sharded":
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
  toks = tokens(2, 40)
  model, tok = from_pretrained(d)
  assert tok is None  # weights-only directory
  assert _maxdiff(model, torch_logits(hf_model(name), toks), toks) <= 1e-4


def test_state_dict_file_plus_config(tmp_path):
  import torch
  name = "gqa_llama3_bias"
  m = hf_model(name)
  sd_path = tmp_path / "weights.pt"
  torch.save(m.state_dict(), sd_path)
  toks = tokens(1, 20)
  ref = torch_logits(m, toks)
  model, _ = from_pretrained(str(sd_path), config=m.config.to_dict(), tokenizer=False)
  assert _maxdiff(model, ref, toks) <= 1e-4
  # a LlamaModel state_dict (no "model." prefix) + a config.json path
  inner = {k[len("model."):] if k.startswith("model.") else k: v for k, v in m.state_dict().items()}
  torch.save(inner, tmp_path / "inner.bin")
  m.config.save_pretrained(tmp_path)
  model2, _ = from_pretrained(str(tmp_path / "inner.bin"), tokenizer=False)
  assert _maxdiff(model2, ref, toks) <= 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_reload_in_torch(name, tmp_path):
  model = linjax_model(name)
  toks = tokens(2, 40)
  ours = np.asarray(model(jnp.asarray(toks))[0])
  out = save_pretrained(model, tmp_path / "hf", max_shard_size="30KB")
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  ref_back = torch_logits(back, toks)
  ref_orig = torch_logits(hf_model(name), toks)
  assert float(np.abs(ref_back - ref_orig).max()) <= 1e-5
  assert float(np.abs(ref_back - ours).max()) <= 1e-4
  # and linjax reads its own export
  again, _ = from_pretrained(out, tokenizer=False)
  np.testing.assert_allclose(np.asarray(again(jnp.asarray(toks))[0]), ours, atol=1e-6)


def test_linjax_checkpoint_roundtrip_any_mixer(tmp_path):
  cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2,
                    mixers=("softmax", "sliding_window"), mixer_kwargs=[{}, {"window": 4}])
  model = Llama(cfg, rngs=nnx.Rngs(3))
  toks = jnp.asarray(tokens(1, 12) % 50)
  ref = np.asarray(model(toks)[0])
  save_linjax(model, tmp_path / "ck")
  assert os.path.isdir(tmp_path / "ck" / "state")
  back, tok = from_pretrained(tmp_path / "ck")
  assert back.config == cfg and tok is None
  np.testing.assert_array_equal(np.asarray(back(toks)[0]), ref)
  bf, _ = from_pretrained(tmp_path / "ck", dtype="bfloat16")
  assert bf.layers[0].mlp.up_proj.kernel.value.dtype == jnp.bfloat16
  # window / sinks are no transformers Llama: the HF export names its own architecture and
  # brings its modeling code (tests/test_hf_export.py checks it against linjax)
  hf = json.load(open(save_pretrained(model, tmp_path / "hf") + "/config.json"))
  assert hf["architectures"] == ["LinjaxLlamaForCausalLM"]
  assert hf["mixers"] == ["softmax", "sliding_window"]
  # LoRA adapters are refused by name unless merged or exported apart
  from linjax.layers.lora import apply_lora
  apply_lora(model, rank=2)
  with pytest.raises(UnsupportedExportError, match="LoRA"):
    save_pretrained(model, tmp_path / "hf2")


def test_shardings_place_each_leaf():
  d = saved_hf_dir("gqa_llama3_bias")
  dev = jax.devices()[0]
  s = jax.sharding.SingleDeviceSharding(dev)
  model, _ = from_pretrained(d, shardings=s, tokenizer=False)
  seen = []

  def fn(path, var):
    seen.append((path, var.get_metadata().get("out_sharding")))
    return s

  from_pretrained(d, shardings=fn, tokenizer=False)
  assert (("embed_tokens", "embedding"), ("vocab", "embed")) in seen
  leaf = model.layers[0].self_attn.q_proj.kernel.value
  assert leaf.sharding == s
  # a State of shardings shaped like the model (what nnx.get_named_sharding returns)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = jax.tree.map(lambda _: named, nnx.state(model))
  m3, _ = from_pretrained(d, shardings=tree, tokenizer=False)
  assert m3.layers[1].self_attn.k_proj.kernel.value.sharding == named


def _corrupt(tmp_path, edit):
  """Copy the saved tiny checkpoint and edit its tensors: edit(dict) -> dict."""
  from safetensors.numpy import load_file, save_file
  src = saved_hf_dir("gqa_llama3_bias")
  d = tmp_path / "bad"
  shutil.copytree(src, d)
  sd = load_file(d / "model.safetensors")
  save_file(edit(sd), d / "model.safetensors", metadata={"format": "pt"})
  return d


def test_mismatches_are_listed_in_one_error(tmp_path):
  def edit(sd):
    del sd["model.layers.0.mlp.up_proj.weight"]
    del sd["model.norm.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    sd["model.layers.1.self_attn.q_proj.weight"] = np.zeros((5, 64), np.float32)
    return sd

  with pytest.raises(CheckpointMismatchError) as e:
    from_pretrained(_corrupt(tmp_path, edit), tokenizer=False)
  err = e.value
  assert sorted(err.missing) == ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
  assert err.unexpected == ["model.layers.0.self_attn.extra.weight"]
  assert [s[0] for s in err.shapes] == ["model.layers.1.self_attn.q_proj.weight"]
  msg = str(err)
  for k in ("up_proj", "model.norm.weight", "extra", "(5, 64)"):
    assert k in msg


def test_bad_inputs_are_named(tmp_path):
  with pytest.raises(FileNotFoundError):
    from_pretrained(tmp_path / "nope.gguf")
  (tmp_path / "x.onnx").write_text("")
  with pytest.raises(UnsupportedFormatError, match="onnx"):
    from_pretrained(tmp_path / "x.onnx")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps(hf_model("gqa_llama3_bias").config.to_dict()))
  with pytest.raises(UnsupportedFormatError, match="model.safetensors"):
    from_pretrained(empty)
  # a GPT-2 checkpoint is refused by architecture name
  gpt2 = tmp_path / "gpt2"
  transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2,
                                                       vocab_size=50)).save_pretrained(gpt2)
  with pytest.raises(UnsupportedConfigError, match="gpt2"):
    from_pretrained(gpt2)
  # a state_dict without a config anywhere
  lone = tmp_path / "lone"
  lone.mkdir()
  (lone / "w.bin").write_bytes(b"")
  with pytest.raises(UnsupportedFormatError, match="config"):
    from_pretrained(lone / "w.bin")


def test_gguf_permutation_is_inverse_and_matches_transformers():
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
  rng = np.random.RandomState(0)
  for heads, kv in ((9, 3), (4, 4)):
    w = rng.randn(kv * 16, 12).astype(np.float32)
    b = rng.randn(kv * 16).astype(np.float32)
    for x in (w, b):
      np.testing.assert_array_equal(mapping.gguf_unpermute(mapping.gguf_permute(x, kv), kv), x)
    proc = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv})
    ref = proc.process(w, "blk.0.attn_k.weight").weights
    cfg = LlamaConfig(hidden_size=heads * 16, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=1, vocab_size=8,
                      intermediate_size=8)
    np.testing.assert_array_equal(mapping.gguf_transform("blk.0.attn_k.weight", w, cfg), ref)
  assert mapping.gguf_to_hf_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
  assert mapping.gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
  assert mapping.gguf_to_hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"


def test_name_table_is_reversible():
  cfg = LlamaConfig.from_hf(hf_model("gqa_llama3_bias").config.to_dict())
  table = mapping.name_table(cfg)
  paths = [p for p, _ in table.values()]
  assert len(set(paths)) == len(paths)
  model_paths = {p for p, _ in nnx.to_flat_state(nnx.state(linjax_model("gqa_llama3_bias"),
                                                            nnx.Param))}
  assert set(paths) == model_paths
  assert set(table) == set(hf_model("gqa_llama3_bias").state_dict())


def test_conversion_cache(tmp_path):
  d = saved_hf_dir("gqa_llama3_bias")
  cache = tmp_path / "cache"
  m1, _ = from_pretrained(d, cache_dir=str(cache), tokenizer=False)
  entries = [e for e in os.listdir(cache) if not e.startswith(".")]
  assert len(entries) == 1 and os.path.isdir(cache / entries[0] / "state")
  m2, _ = from_pretrained(d, cache_dir=str(cache), tokenizer=False)
  toks = jnp.asarray(tokens(1, 10))
  np.testing.assert_array_equal(np.asarray(m1(toks)[0]), np.asarray(m2(toks)[0]))
  assert os.listdir(cache) == entries
