"""LoRA: wrapping by name, merged == unmerged forward, adapters saved / loaded alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linjax.layers.lora import (LoRALinear, apply_lora, load_lora, lora_modules, merge_lora,
                                save_lora)
from linjax.layers.params import LoRAParam
from linjax.models.llama import Llama, LlamaConfig
from linjax.train.config import tiny_llama_dict
from tests.helpers import assert_rel


def _model(seed=0):
  cfg = LlamaConfig(**{**tiny_llama_dict(), "vocab_size": 97})
  return Llama(cfg, rngs=nnx.Rngs(seed))


def _randomize_lora(model, seed=1):
  st = nnx.state(model, LoRAParam)
  leaves, tree = jax.tree.flatten(st)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def _logits(model, tokens):
  return np.asarray(model(tokens)[0])


def test_apply_merge_equals_unmerged_and_restores_structure():
  model = _model()
  tokens = jax.random.randint(jax.random.key(0), (2, 19), 0, 97)
  paths_before = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
  base = _logits(model, tokens)
  done = apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "mlp.down_proj"))
  assert len(done) == 3 * 2 and all(d.split(".")[-1] in ("q_proj", "v_proj", "down_proj")
                                    for d in done)
  assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
  assert not isinstance(model.layers[0].self_attn.k_proj, LoRALinear)
  # B = 0 at init: the model is unchanged
  np.testing.assert_allclose(_logits(model, tokens), base, atol=1e-6)
  _randomize_lora(model)
  unmerged = _logits(model, tokens)
  assert np.abs(unmerged - base).max() > 1e-3
  merged_paths = merge_lora(model)
  assert sorted(merged_paths) == sorted(done) and not lora_modules(model)
  assert {p for p, _ in nnx.to_flat_state(nnx.state(model))} == paths_before
  assert_rel(unmerged, _logits(model, tokens), 1e-5, "merged vs unmerged logits")


def test_lora_params_carry_sharding_axes():
  model = _model()
  apply_lora(model, rank=2, alpha=2.0, targets=("q_proj",))
  q = model.layers[0].self_attn.q_proj
  assert q.lora_a.get_metadata()["out_sharding"] == ("embed", None)
  assert q.lora_b.get_metadata()["out_sharding"] == (None, "heads")


def test_save_and_load_adapters_alone(tmp_path):
  model = _model()
  apply_lora(model, rank=3, alpha=6.0, targets=("q_proj", "o_proj"))
  _randomize_lora(model, seed=5)
  tokens = jax.random.randint(jax.random.key(1), (1, 11), 0, 97)
  want = _logits(model, tokens)
  save_lora(model, str(tmp_path / "ad"))
  assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
      "adapters.safetensors", "lora_config.json"]
  fresh = _model()                     # same base weights, no adapters yet
  load_lora(fresh, str(tmp_path / "ad"))
  assert_rel(want, _logits(fresh, tokens), 1e-6, "reloaded adapters")
  other = _model(seed=3)
  apply_lora(other, rank=2, alpha=1.0, targets=("q_proj", "o_proj"))
  with pytest.raises(ValueError, match="shape"):
    load_lora(other, str(tmp_path / "ad"))


def test_no_matching_target_is_an_error():
  with pytest.raises(ValueError, match="match no linear"):
    apply_lora(_model(), rank=2, alpha=2.0, targets=("wq",))


def test_dropout_only_in_training_mode():
  model = _model()
  apply_lora(model, rank=2, alpha=2.0, dropout=0.5, targets=("q_proj",))
  _randomize_lora(model)
  tokens = jnp.arange(8)[None] % 97
  a, b = _logits(model, tokens), _logits(model, tokens)
  assert np.abs(a - b).max() > 0          # dropout masks differ between calls
  model.eval()
  np.testing.assert_array_equal(_logits(model, tokens), _logits(model, tokens))
