"""linjax.linearize: weights copied, config updated and saved, recipes' losses decrease."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import linjax
from linjax.layers.params import FeatureMapParam
from linjax.linearize import linearize, recipes
from linjax.models.llama import Llama, LlamaConfig
from tests.helpers import assert_rel


def tiny_llama(seed=0, layers=2):
  cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64,
                    num_hidden_layers=layers, num_attention_heads=3, num_key_value_heads=1,
                    head_dim=16, max_position_embeddings=256, rope_theta=1000.0)
  return Llama(cfg, rngs=nnx.Rngs(seed))


def tokens(B=2, T=40, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, 97)


def test_linearize_copies_qkvo_and_updates_config():
  teacher = tiny_llama()
  student = linearize(teacher, "lolcats", layers=[1], window=8)
  assert student is not teacher and teacher.config.mixers == ("softmax", "softmax")
  assert type(teacher.layers[1].self_attn).__name__ == "LlamaAttention"   # teacher intact
  assert student.config.mixers == ("softmax", "lolcats")
  assert student.config.layer_mixer_kwargs(1) == {"window": 8}
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    a = getattr(teacher.layers[1].self_attn, name).kernel[...]
    b = getattr(student.layers[1].self_attn, name).kernel[...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert type(student.layers[0].self_attn) is type(teacher.layers[0].self_attn)
  # new parameters are FeatureMapParams, nothing else was added
  n_new = len(jax.tree.leaves(nnx.state(student, FeatureMapParam)))
  assert n_new == 3  # feature_map_q.weight, feature_map_k.weight, window_factors


def test_lolcats_with_a_window_covering_everything_is_the_teacher():
  """LoLCATs' softmax part alone (window >= T) reproduces softmax attention exactly."""
  teacher = tiny_llama()
  student = linearize(nnx.clone(teacher), "lolcats", window=64)
  x = tokens()
  assert_rel(teacher(x)[0], student(x)[0], 1e-5, "lolcats window>=T vs softmax")


def test_linearized_checkpoint_round_trip(tmp_path):
  from linjax.convert import save_linjax
  model = linearize(tiny_llama(), "lolcats", layers=[0], window=8, variant="tk")
  # perturb the feature maps so a default-initialised reload would differ
  st = nnx.state(model, FeatureMapParam)
  nnx.update(model, jax.tree.map(lambda a: a + 0.1, st))
  save_linjax(model, str(tmp_path / "ckpt"))
  loaded = linjax.from_pretrained(str(tmp_path / "ckpt"), tokenizer=False)
  loaded = loaded[0] if isinstance(loaded, tuple) else loaded
  assert loaded.config.mixers == ("lolcats", "softmax")
  x = tokens()
  assert_rel(model(x)[0], loaded(x)[0], 1e-6, "reloaded linearized model")


@pytest.mark.parametrize("mixer,kw,kind", [("lolcats", dict(window=8), "mse"),
                                           ("linear", dict(feature_map="hedgehog"), "xent")])
def test_attention_transfer_decreases_loss(mixer, kw, kind):
  model = linearize(tiny_llama(), mixer, **kw)
  batch = np.asarray(tokens(B=2, T=32))
  batches = np.stack([batch] * 12)
  hist = recipes.attention_transfer(model, batches, lr=3e-2, kind=kind, progress=False, log=None)
  if kind == "mse":
    assert hist["loss"][-1] < 0.8 * hist["loss"][0], hist["loss"]
  else:  # cross-entropy has the teacher's entropy as its floor: check it moves down steadily
    assert all(b < a for a, b in zip(hist["loss"], hist["loss"][1:])), hist["loss"]
  # only feature maps moved
  assert model.layers[0].self_attn.distill is None and model.layers[0].self_attn.method == "auto"


def test_lora_finetune_decreases_ce():
  from linjax.layers.lora import apply_lora, merge_lora
  from linjax.layers.params import LoRAParam
  model = linearize(tiny_llama(), "liger", window=8)
  apply_lora(model, rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj"))
  batches = np.stack([np.asarray(tokens(B=2, T=32, seed=1))] * 10)
  hist = recipes.finetune(model, batches, lr=3e-2, trainable=LoRAParam, progress=False, log=None)
  assert hist["loss"][-1] < hist["loss"][0] - 0.05, hist["loss"]
  merge_lora(model)
  assert model.config.mixers == ("liger", "liger")


def test_trainer_loss_registry_has_transfer_losses():
  from linjax.train.losses import get_loss
  model = linearize(tiny_llama(), "lolcats", window=8)
  x = tokens(B=1, T=24)
  batch = {"input_ids": x, "positions": jnp.arange(24)[None].astype(jnp.int32),
           "segment_ids": jnp.ones((1, 24), jnp.int32)}
  loss, metrics = get_loss("attention_transfer")(model, batch, None)
  assert np.isfinite(float(loss)) and float(metrics["transfer_loss"]) > 0
  assert model.layers[0].self_attn.distill is None
  loss, _ = get_loss("hedgehog")(model, batch, None)
  assert np.isfinite(float(loss))


@pytest.mark.parametrize("exp", ["lolcats"] + [pytest.param(e, marks=pytest.mark.slow)
                                              for e in ("liger", "hedgehog", "supra")])
def test_experiment_configs_run_on_a_tiny_model(exp):
  from linjax.linearize.run import load_config, run_one
  cfg = load_config(f"experiments/{exp}_smollm2.py:cpu")
  cfg.seq_len = 32
  for s in (cfg.stage1, cfg.stage2):
    s.steps = min(s.steps, 2)
    s.batch_size = 1
  if "window" in cfg.mixer_kwargs:
    cfg.mixer_kwargs = dict(cfg.mixer_kwargs, window=8)
  teacher = tiny_llama()
  train = np.asarray(tokens(B=1, T=400, seed=5))[0]
  held = np.asarray(tokens(B=1, T=64, seed=6))[0]
  res, student = run_one(cfg, teacher, train, held, progress=False, log=lambda *a: None)
  assert np.isfinite(res["ppl"]) and 0 <= res["top1"] <= 1
  assert res["tokens"] == (cfg.stage1.steps + cfg.stage2.steps) * 32
  assert student.config.mixers[0] == cfg.mixer


def test_top_level_linearize_is_callable_after_the_package_is_imported():
  import linjax.linearize  # noqa: F401  (binds the attribute to the package)
  model = linjax.linearize(tiny_llama(layers=1), mixer="gla")
  assert model.config.mixers == ("gla",)


def test_recipe_summary_table_and_png(tmp_path, capsys):
  import json

  from linjax.linearize import summary
  runs = [dict(name="b_run", tokens=2048, ppl=30.0, ppl_ratio=2.0, top1=0.5, wall_seconds=12.4,
               machine="cpu"),
          dict(name="a_run", tokens=40960, ppl=18.0, ppl_ratio=1.2, top1=0.71, wall_seconds=99.6,
               machine="gpu")]
  for r in runs:
    (tmp_path / f"{r['name']}.json").write_text(json.dumps(r))
  (tmp_path / "other.json").write_text(json.dumps({"not": "a run"}))
  (tmp_path / "eval_quick_baselines.json").write_text(json.dumps(
      {"teacher (teacher)": {"perplexity": 10.0}, "sw64_sinks4": {"perplexity": 12.0}}))
  assert summary.baseline_ratio(str(tmp_path)) == pytest.approx(1.2)
  summary.main([str(tmp_path)])
  out = capsys.readouterr().out
  lines = [l for l in out.splitlines() if l.startswith("| ") and "_run" in l]
  assert lines == ["| a_run | 40,960 | 18.00 | 1.200 | 71.0% | 100 s | gpu |",
                   "| b_run | 2,048 | 30.00 | 2.000 | 50.0% | 12 s | cpu |"]   # best first
  png = tmp_path / "linearization.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(ValueError, match="broken.json"):
    summary.load_runs(str(tmp_path))


def test_finetune_rate_follows_the_budget():
  """The cosine runs over the steps or the time budget, whichever ends first, and the rate
  handed to the jitted step is the one Adam applies (first Adam step moves each weight by
  about the rate)."""
  from linjax.layers.lora import apply_lora
  from linjax.layers.params import LoRAParam

  def student():
    m = linearize(tiny_llama(layers=1), "gla")
    apply_lora(m, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    return m
  assert recipes.budget_lr(1e-3, 0, 0.0) == pytest.approx(1e-3)
  assert recipes.budget_lr(1e-3, 9, 0.5) == pytest.approx(0.55e-3)
  assert recipes.budget_lr(1e-3, 50, 1.0) == pytest.approx(1e-4)
  assert recipes.budget_lr(1e-3, 1, 0.0, warmup=4) == pytest.approx(0.5e-3)
  batches = np.asarray(tokens(B=1, T=33, seed=3))[None].repeat(6, 0)
  # no budget: cosine over the 6 steps
  model = student()
  h = recipes.finetune(model, batches, lr=1e-2, trainable=LoRAParam, progress=False, log=None)
  np.testing.assert_allclose(h["lr"], [recipes.budget_lr(1e-2, i, i / 5) for i in range(6)])
  # a budget that ends right after the compiling step: the next step runs at the floor
  model = student()
  h = recipes.finetune(model, batches, lr=1e-2, trainable=LoRAParam, progress=False, log=None,
                       time_budget=1e-9)
  assert h["steps"] == 2 and h["lr"] == pytest.approx([1e-2, 1e-3])
  # the rate reaches Adam: one step at rate r moves the LoRA weights by about r at most
  for r in (1e-2, 1e-4):
    model = student()
    before = jax.tree.map(np.asarray, nnx.state(model, LoRAParam))
    recipes.finetune(model, batches[:1], lr=r, trainable=LoRAParam, progress=False, log=None)
    after = jax.tree.map(np.asarray, nnx.state(model, LoRAParam))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after),
                                                            jax.tree.leaves(before)))
    assert 0.5 * r < moved <= 1.01 * r, (r, moved)


def test_finetune_records_grad_norm_and_stops_on_non_finite_loss():
  """hist["grad_norm"][0] is the global norm of the LoRA gradient at the start (computed
  here separately, before any update); a NaN weight stops the run with a named error."""
  from linjax.layers.lora import apply_lora
  from linjax.layers.params import LoRAParam
  from linjax.train.trainer import NonFiniteLossError

  m = linearize(tiny_llama(layers=1), "gla")
  apply_lora(m, rank=4, alpha=8, targets=("q_proj", "v_proj"))
  nnx.update(m, jax.tree.map(lambda a: a + 0.05, nnx.state(m, LoRAParam)))  # B != 0: all grads live
  batches = np.asarray(tokens(B=1, T=33, seed=4))[None].repeat(2, 0)
  ref = nnx.clone(m)
  g = nnx.grad(recipes.lm_loss, argnums=nnx.DiffState(0, LoRAParam))(ref, jnp.asarray(batches[0]))
  want = float(np.sqrt(sum(float((np.asarray(x) ** 2).sum()) for x in jax.tree.leaves(g))))
  h = recipes.finetune(m, batches, lr=1e-3, trainable=LoRAParam, progress=False, log=None)
  assert want > 0 and h["grad_norm"][0] == pytest.approx(want, rel=1e-5)
  assert len(h["grad_norm"]) == 2
  nnx.update(m, jax.tree.map(lambda a: a * np.nan, nnx.state(m, LoRAParam)))
  with pytest.raises(NonFiniteLossError, match="fine-tune.*non-finite loss.*step 0"):
    recipes.finetune(m, batches, lr=1e-3, trainable=LoRAParam, progress=False, log=None)


def test_linearize_names_bad_layers_and_kwargs():
  model = tiny_llama()
  with pytest.raises(ValueError, match="layer index 5 is out of range for a model with 2 layers"):
    linearize(model, "lolcats", layers=[5])
  with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['windw'\] for mixer "
                                       r"'lolcats'; valid: .*'window'"):
    linearize(model, "lolcats", windw=8)
  assert linearize(model, "gla", layers=[-1]).config.mixers == ("softmax", "gla")


def test_set_method_is_recorded_in_the_config_and_reloads(tmp_path):
  from linjax.convert import save_linjax
  from linjax.linearize import set_method
  model = set_method(linearize(tiny_llama(), "gla", layers=[0]), "assoc_scan", softmax="chunk")
  assert model.layers[0].self_attn.method == "assoc_scan"
  assert model.layers[1].self_attn.method == "chunk"
  assert model.config.layer_mixer_kwargs(0)["method"] == "assoc_scan"
  save_linjax(model, str(tmp_path / "m"))
  loaded, _ = linjax.from_pretrained(str(tmp_path / "m"), tokenizer=False)
  assert loaded.layers[0].self_attn.method == "assoc_scan"
  assert loaded.layers[1].self_attn.method == "chunk"
  with pytest.raises(ValueError, match="method"):
    set_method(model, "flash")
