"""Llama model: config parsing, parity with transformers, KV-cache decoding, mixer slot."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_llama_common import (CONFIGS, VOCAB, hf_config, hf_model, linjax_model,
                                     tokens, torch_logits)
from linjax.models.llama import Llama, LlamaConfig, UnsupportedConfigError


def small_config(**kw):
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
  base.update(kw)
  return LlamaConfig(**base)


# --- config -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_from_hf_roundtrip(name):
  hc = hf_config(name)
  cfg = LlamaConfig.from_hf(hc.to_dict())
  assert cfg.num_key_value_heads == hc.num_key_value_heads
  assert cfg.head_dim == hc.head_dim
  assert cfg.tie_word_embeddings == hc.tie_word_embeddings
  assert cfg.rope_scaling["rope_type"] == CONFIGS[name]["rope_scaling"]["rope_type"]
  assert cfg.mixers == ("softmax",) * hc.num_hidden_layers
  again = LlamaConfig.from_hf(cfg.to_hf())
  assert again == cfg
  # transformers reads what to_hf writes
  import transformers
  back = transformers.LlamaConfig(**cfg.to_hf())
  assert back.rope_parameters["rope_type"] == cfg.rope_scaling["rope_type"]


def test_config_transformers4_layout_and_linjax_fields():
  hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "rope_theta": 1e5,
        "rope_scaling": {"type": "linear", "factor": 4.0}, "torch_dtype": "bfloat16",
        "linjax": {"mixers": ["softmax", "sliding_window"], "mixer_kwargs": [{}, {"window": 8}]}}
  cfg = LlamaConfig.from_hf(hf, dtype="bfloat16")
  assert cfg.rope_theta == 1e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
  assert cfg.num_key_value_heads == 2 and cfg.head_dim == 4
  assert cfg.mixers == ("softmax", "sliding_window")
  assert cfg.layer_mixer_kwargs(1) == {"window": 8} and cfg.dtype == "bfloat16"
  assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
  hash(cfg)


@pytest.mark.parametrize("bad, match", [
    ({"model_type": "gpt2"}, "gpt2"),
    ({"architectures": ["MistralForCausalLM"]}, "Mistral"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"linjax": {"mixers": ["softmax"]}}, "mixers"),
    ({"linjax": {"colour": 1}}, "colour"),
])
def test_config_refuses_unsupported(bad, match):
  hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2}
  hf.update(bad)
  with pytest.raises(UnsupportedConfigError, match=match):
    LlamaConfig.from_hf(hf)


def test_unknown_mixer_is_named():
  with pytest.raises(ValueError, match="no_such_mixer"):
    Llama(small_config(mixers="no_such_mixer"), rngs=nnx.Rngs(0))


# --- parity with transformers ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
  toks = tokens(2, 40)
  ref = torch_logits(hf_model(name), toks)
  out, cache = linjax_model(name)(jnp.asarray(toks))
  assert cache is None
  err = float(np.abs(np.asarray(out) - ref).max())
  assert err <= 1e-4, f"{name}: max abs diff {err:.2e}"


def test_rotary_matches_transformers():
  import torch
  from transformers.models.llama import modeling_llama as ml
  from linjax.layers import rotary
  for name in sorted(CONFIGS):
    hc = hf_config(name)
    emb = ml.LlamaRotaryEmbedding(hc)
    cfg = LlamaConfig.from_hf(hc.to_dict())
    freqs = rotary.inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                            cfg.max_position_embeddings)
    np.testing.assert_array_equal(freqs, emb.inv_freq.numpy())
    pos = np.arange(300)[None]
    cos_t, sin_t = emb(torch.zeros(1, 300, cfg.head_dim), torch.as_tensor(pos))
    cos, sin = rotary.cos_sin(jnp.asarray(pos), freqs, jnp.float32)
    np.testing.assert_allclose(np.asarray(cos), cos_t.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_t.numpy(), atol=1e-6)


def test_packed_segments_and_positions_match_separate_documents():
  model = linjax_model("gqa_llama3_bias")
  a, b = tokens(1, 12, seed=1), tokens(1, 9, seed=2)
  packed = np.concatenate([a, b], 1)
  seg = np.array([[1] * 12 + [2] * 9])
  pos = np.array([list(range(12)) + list(range(9))])
  out, _ = model(jnp.asarray(packed), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
  ra, _ = model(jnp.asarray(a))
  rb, _ = model(jnp.asarray(b))
  np.testing.assert_allclose(np.asarray(out), np.concatenate([ra, rb], 1), atol=1e-5)


# --- decoding ---------------------------------------------------------------------------------

def _decode_all(model, toks, prefill, max_len, chunk=1):
  cache = model.init_cache(toks.shape[0], max_len)
  outs = []
  lo, cache = model(jnp.asarray(toks[:, :prefill]), cache=cache)
  outs.append(lo)
  step = jax.jit(lambda gd, st, c, t: nnx.merge(gd, st)(t, cache=c), static_argnums=0)
  gd, st = nnx.split(model)
  for t in range(prefill, toks.shape[1], chunk):
    lo, cache = step(gd, st, cache, jnp.asarray(toks[:, t:t + chunk]))
    outs.append(lo)
  return np.concatenate([np.asarray(o) for o in outs], 1), cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_decode_equals_full_forward(name):
  model = linjax_model(name)
  toks = tokens(2, 30, seed=3)
  full, _ = model(jnp.asarray(toks))
  dec, cache = _decode_all(model, toks, prefill=17, max_len=32)
  np.testing.assert_allclose(dec, np.asarray(full), atol=2e-5)
  np.testing.assert_array_equal(np.asarray(cache["next_pos"]), [30, 30])


def test_sliding_window_ring_cache_equals_full_forward():
  cfg = small_config(num_hidden_layers=2, mixers=("sliding_window", "softmax"),
                     mixer_kwargs=[{"window": 6, "num_sinks": 2}, {"window": 5}])
  model = Llama(cfg, rngs=nnx.Rngs(1))
  sw = model.layers[0].self_attn
  assert (sw.window, sw.num_sinks) == (6, 2)
  assert model.layers[1].self_attn.window == 5
  toks = tokens(2, 40, seed=4)
  full, _ = model(jnp.asarray(toks))
  # ring caches hold sinks + window slots, not the whole context
  cache = model.init_cache(2, 64)
  assert cache["layers"][0]["k"].shape[1] == 8 and cache["layers"][1]["k"].shape[1] == 5
  # a prefill longer than the ring, then single steps and 3-token chunks
  dec, _ = _decode_all(model, toks, prefill=13, max_len=64)
  np.testing.assert_allclose(dec, np.asarray(full), atol=2e-5)
  dec3, _ = _decode_all(model, toks, prefill=10, max_len=64, chunk=3)
  np.testing.assert_allclose(dec3, np.asarray(full), atol=2e-5)
  # the window really limits attention: the far past does not matter
  toks2 = toks.copy()
  toks2[:, 3:20] = (toks2[:, 3:20] + 1) % VOCAB
  full2, _ = model(jnp.asarray(toks2))
  np.testing.assert_allclose(np.asarray(full2)[:, 32:], np.asarray(full)[:, 32:], atol=1e-5)


def test_sliding_window_default_registered():
  from linjax.layers.mixers import available_mixers
  assert {"softmax", "sliding_window"} <= set(available_mixers())
  model = Llama(small_config(mixers="sliding_window"), rngs=nnx.Rngs(0))
  assert (model.layers[0].self_attn.window, model.layers[0].self_attn.num_sinks) == (64, 4)


def test_left_padded_cache_rows_ignore_padding():
  model = linjax_model("gqa_llama3_bias")
  a = tokens(1, 9, seed=5)[0]
  pad = 4
  row = np.concatenate([np.full(pad, 7), a])[None]
  pos = np.maximum(np.arange(pad + 9) - pad, 0)[None]
  seg = (np.arange(pad + 9) >= pad).astype(np.int32)[None]
  cache = model.init_cache(1, 20)
  lo, cache = model(jnp.asarray(row), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg),
                    cache=cache)
  ref, _ = model(jnp.asarray(a[None]))
  np.testing.assert_allclose(np.asarray(lo)[:, pad:], np.asarray(ref), atol=2e-5)
  assert int(cache["next_pos"][0]) == 9
  nxt = np.array([[11]])
  lo2, _ = model(jnp.asarray(nxt), cache=cache)
  ref2, _ = model(jnp.asarray(np.concatenate([a[None], nxt], 1)))
  np.testing.assert_allclose(np.asarray(lo2)[:, 0], np.asarray(ref2)[:, -1], atol=2e-5)


# --- model structure ------------------------------------------------------------------------

def test_every_param_has_logical_axes():
  model = Llama(small_config(attention_bias=True, mlp_bias=True), rngs=nnx.Rngs(0))
  want = {"embedding": ("vocab", "embed"), "q_proj": ("embed", "heads"),
          "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
          "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"),
          "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed"),
          "lm_head": ("embed", "vocab")}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.value.ndim, (path, axes)
    owner = path[-2] if path[-1] in ("kernel", "bias") else path[-1]
    if path[-1] == "kernel" or path[-1] == "embedding":
      assert axes == want[owner], (path, axes)
    elif path[-1] == "bias":
      assert axes == (want[owner][1],), (path, axes)
    else:
      assert axes == ("norm",), (path, axes)


def test_tied_model_has_no_lm_head_and_bf16_runs():
  cfg = small_config(tie_word_embeddings=True)
  f32 = Llama(cfg, rngs=nnx.Rngs(0))
  assert f32.lm_head is None
  model = Llama(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert model.layers[0].self_attn.q_proj.kernel.value.dtype == jnp.bfloat16
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(f32)))
  out, _ = model(jnp.asarray(tokens(1, 8)))
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  ref, _ = f32(jnp.asarray(tokens(1, 8)))
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.05


def test_return_hidden_and_remat():
  cfg = small_config()
  model = Llama(cfg, rngs=nnx.Rngs(0))
  toks = jnp.asarray(tokens(2, 10))
  logits, _, hid = model(toks, return_hidden=True)
  assert len(hid["layer_inputs"]) == len(hid["mixer_inputs"]) == len(hid["mixer_outputs"]) == 2
  layer = model.layers[1]
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  y, _ = layer.self_attn(hid["mixer_inputs"][1], positions=pos)
  np.testing.assert_allclose(np.asarray(y), np.asarray(hid["mixer_outputs"][1]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(layer.input_layernorm(hid["layer_inputs"][1])),
                             np.asarray(hid["mixer_inputs"][1]), atol=1e-6)
  assert set(model.hidden_states(toks)) >= {"layer_inputs", "mixer_inputs", "final"}
  remat = Llama(cfg.replace(remat=True), rngs=nnx.Rngs(0))

  def loss(m):
    return m(toks)[0].mean()

  g1 = nnx.grad(loss)(model)
  g2 = nnx.grad(loss)(remat)
  np.testing.assert_allclose(np.asarray(g1.layers[0].mlp.up_proj.kernel.value),
                             np.asarray(g2.layers[0].mlp.up_proj.kernel.value), atol=1e-6)
  np.testing.assert_allclose(np.asarray(remat(toks)[0]), np.asarray(logits), atol=1e-6)


def test_full_cache_overflow_raises_instead_of_dropping_tokens():
  model = Llama(small_config(), rngs=nnx.Rngs(0))
  toks = jnp.asarray(tokens(1, 6, seed=6))
  cache = model.init_cache(1, 4)  # too small for 6 tokens
  with pytest.raises(Exception, match="does not fit the KV cache of 4 slots"):
    logits, _ = model(toks, cache=cache)
    jax.block_until_ready(logits)
  step = jax.jit(lambda t, c: model(t, cache=c))  # also under jit
  cache = model.init_cache(1, 6)
  _, cache = step(toks, cache)
  with pytest.raises(Exception, match="does not fit the KV cache of 6 slots"):
    jax.block_until_ready(step(toks[:, :1], cache)[0])


@pytest.mark.parametrize("mixers", [("softmax",) * 3, ("gla",) * 3, ("lolcats",) * 3])
def test_scan_layers_equals_the_loop(mixers):
  """scan_layers: one lax.scan over the stacked layers gives the loop's logits, gradients,
  prefill + decode; with remat too. The weights keep their per-layer paths."""
  kw = dict(num_hidden_layers=3, mixers=mixers)
  loop = Llama(small_config(**kw), rngs=nnx.Rngs(0))
  scan = Llama(small_config(scan_layers=True, remat="dots_with_no_batch_dims_saveable", **kw),
               rngs=nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(loop)) == jax.tree.structure(nnx.state(scan))
  toks = jnp.asarray(tokens(2, 12, seed=3))
  fwd = nnx.jit(lambda m, t: m(t)[0])
  np.testing.assert_allclose(np.asarray(fwd(scan, toks)), np.asarray(fwd(loop, toks)),
                             rtol=1e-5, atol=1e-5)
  # the scanned forward holds one layer's program, not three
  scans = [e for e in jax.make_jaxpr(lambda t: scan(t)[0])(toks).eqns if e.primitive.name == "scan"]
  assert any(e.params["length"] == 3 for e in scans)
  loss = lambda m: (m(toks)[0] ** 2).mean()
  g1, g2 = nnx.grad(loss)(loop), nnx.grad(loss)(scan)
  for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g2))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  step = nnx.jit(lambda m, t, c: m(t, cache=c))
  outs = []
  for m in (loop, scan):
    c = m.init_cache(2, 16)
    l1, c = step(m, toks[:, :9], c)
    l2, c = step(m, toks[:, 9:10], c)
    outs.append(np.concatenate([np.asarray(l1), np.asarray(l2)], 1))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_scan_layers_over_different_layers_runs_the_loop():
  m = Llama(small_config(mixers=("softmax", "gla"), scan_layers=True), rngs=nnx.Rngs(0))
  toks = jnp.asarray(tokens(1, 8, seed=1))
  with pytest.warns(UserWarning, match="layers differ"):
    out = m(toks)[0]
  ref = Llama(small_config(mixers=("softmax", "gla")), rngs=nnx.Rngs(0))(toks)[0]
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)
  with pytest.raises(Exception, match="remat must be a bool or the name"):
    small_config(remat="some_policy")


@pytest.mark.parametrize("mixers", [("softmax", "softmax"), ("lolcats", "softmax")])
def test_last_only_logits_are_the_last_row_of_the_full_logits(mixers):
  """The prefill form (`last_only=True`, what `linjax.generate` compiles) equals the last
  position of the full logits, with and without a cache, and fills the same cache; the
  recurrent transformer too."""
  from linjax.models.recurrent_transformer import (RecurrentTransformer,
                                                   RecurrentTransformerConfig)
  cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                    max_position_embeddings=128, mixers=mixers,
                    mixer_kwargs=[{"window": 4} if m == "lolcats" else {} for m in mixers])
  rt = RecurrentTransformer(RecurrentTransformerConfig(
      vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=2, window=4), rngs=nnx.Rngs(1))
  toks = jax.random.randint(jax.random.PRNGKey(0), (2, 11), 0, 97)
  for model in (Llama(cfg, rngs=nnx.Rngs(0)), rt):
    full, _ = model(toks)
    last, _ = model(toks, last_only=True)
    assert last.shape == (2, 1, 97)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), rtol=1e-5,
                               atol=1e-5)
    full_c, cache_a = model(toks, cache=model.init_cache(2, 16))
    last_c, cache_b = model(toks, cache=model.init_cache(2, 16), last_only=True)
    np.testing.assert_allclose(np.asarray(last_c[:, 0]), np.asarray(full_c[:, -1]),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(cache_a), jax.tree.leaves(cache_b)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
