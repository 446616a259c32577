"""linjax.linearize: weights copied, config updated and saved, recipes' losses decrease."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import linjax
from linjax.layers.params import FeatureMapParam
from linjax.linearize import linearize
from linjax.models.llama import Llama, LlamaConfig
from tests.helpers import assert_rel, load_module


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


@pytest.mark.parametrize("mixer,kw,kind", [("lolcats", dict(window=8), "attention_mse"),
                                           ("linear", dict(feature_map="hedgehog"),
                                            "attention_xent")])
def test_attention_transfer_stage_decreases_its_loss(tmp_path, mixer, kw, kind):
  """A stage of attention transfer (feature maps only) through the one training loop, on a
  fixed batch: the per-layer transfer loss goes down; the model leaves distill mode."""
  from linjax.train import base_config, stage, stages, train
  c = base_config()
  c.model.tiny = dict(c.model.tiny.to_dict(), num_hidden_layers=2)
  c.data.tokenizer, c.data.embedded_split, c.data.max_rows = "byte", "pydoc", 2
  c.progress, c.ckpt.export, c.data.shuffle = False, False, False
  c.linearize = {"mixer": mixer, **kw}
  c.stages = stages(transfer=stage(steps=12, seq_len=32, batch_size=2, trainable="feature_maps",
                                   objective={kind: 1.0}, transfer_scale=100.0, log_every=1,
                                   ckpt_every=0, optim={"lr": 3e-2, "schedule": "constant"}))
  s = train(c, str(tmp_path / "w"))
  st = s["stages"][0]
  if kind == "attention_mse":
    assert st["final_loss"] < 0.8 * st["first_loss"], st
  else:   # cross-entropy has the teacher's entropy as its floor: check the loss went down
    rows = [__import__("json").loads(l) for l in open(tmp_path / "w" / "stages" / "0_transfer" /
                                                       "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0] and sum(b < a for a, b in zip(losses, losses[1:])) >= 9, losses
  assert all(getattr(l.self_attn, "distill", None) is None for l in s["model"].layers)


RECIPES = [("lolcats", "linjax_15m"), ("lolcats", "paper_15m")] + [
    pytest.param(e, a, marks=pytest.mark.slow) for e in ("liger", "hedgehog", "supra")
    for a in ("paper_15m", "linjax_15m")]


@pytest.mark.parametrize("exp,arg", RECIPES)
def test_recipe_configs_run_on_a_tiny_model(tmp_path, exp, arg):
  """Every recipe config runs through the training loop end to end when its model is swapped
  for a tiny random Llama and its budgets for two steps."""
  from linjax.train import train
  c = load_module(f"experiments/{exp}_smollm2.py", "exp").get_config(arg)
  c.model.source, c.model.scan_layers = "tiny", False
  c.data.embedded_split, c.data.max_rows, c.progress = "pydoc", 16, False
  if "window" in c.linearize:
    c.linearize.window = 8
  c.calibrate.tokens = min(c.calibrate.tokens, 64)
  c.keep_softmax.layers = min(c.keep_softmax.layers, 1)   # of the tiny model's 2 layers
  for st in c.stages.values():
    st.steps, st.time_budget_s, st.seq_len, st.batch_size, st.grad_accum = 2, 0.0, 32, 2, 1
    st.eval_every, st.eval_rows, st.ckpt_every = 0, 2, 0
  s = train(c, str(tmp_path / "w"))
  assert [x["steps"] for x in s["stages"]] == [2] * len(c.stages)
  assert all(np.isfinite(x["final_loss"]) for x in s["stages"])
  assert c.linearize.mixer in s["model"].config.mixers


def test_top_level_linearize_is_callable_after_the_package_is_imported():
  import linjax.linearize  # noqa: F401  (binds the attribute to the package)
  model = linjax.linearize(tiny_llama(layers=1), mixer="gla")
  assert model.config.mixers == ("gla",)


def test_recipe_summary_table_and_png(tmp_path):
  import json

  from linjax.linearize import summary
  runs = []
  for name, toks, wall in (("a_run", [1000, 2000], 60.0), ("b_run", [0, 500], 30.0)):
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps(
        {"stages": [{"stage": "s1", "tokens": toks[0]}, {"stage": "s2", "tokens": toks[1]}],
         "wall_s": wall, "config": {"linearize": {"mixer": "lolcats"}}}))
    runs.append(str(d))
  r = lambda ppl, top1, kl: {"perplexity": ppl, "ppl_ratio": ppl / 10.0, "top1_agreement": top1,
                             "top1_ci": [top1 - 0.01, top1 + 0.01], "kl": kl,
                             "kl_ci": [kl - 0.02, kl + 0.02], "passkey": {"128": 0.5},
                             "mqar": {"128": 0.25}}
  ev = {"teacher": {"perplexity": 10.0, "passkey": {"128": 1.0}, "mqar": {"128": 0.9}},
        "sliding window 64 + 4 sinks": r(12.0, 0.83, 0.2),
        "a_run": r(11.0, 0.9, 0.1), "b_run": r(15.0, 0.7, 0.5)}
  (tmp_path / "results.json").write_text(json.dumps(ev))
  text = summary.main(["--eval", str(tmp_path / "results.json"), "--runs", *runs,
                       "--out", str(tmp_path / "out" / "lin")])
  rows = [l for l in text.splitlines() if l.startswith("| ") and "model" not in l]
  assert rows[0].startswith("| teacher | - | - | 10.00 | - |")
  assert rows[2] == ("| a_run | 3,000 | 1.0 min | 11.00 | 1.100 | 0.900 (0.890-0.910) | "
                     "0.100 (0.080-0.120) | 0.50 | 0.25 |")
  assert rows[3].startswith("| b_run | 500 | 0.5 min |")
  assert (tmp_path / "out" / "lin.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="c_run"):
    d = tmp_path / "c_run"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"stages": [], "wall_s": 1.0}))
    summary.main(["--eval", str(tmp_path / "results.json"), "--runs", str(d),
                  "--out", str(tmp_path / "x")])


def test_recipe_summary_merges_evaluations_with_the_same_teacher(tmp_path):
  import json

  from linjax.linearize import summary
  d = tmp_path / "x_step0"      # an untrained run (every stage skipped): 0 tokens
  d.mkdir()
  (d / "summary.json").write_text(json.dumps({"stages": [], "wall_s": 12.0}))
  row = {"perplexity": 40.0, "ppl_ratio": 4.0, "top1_agreement": 0.2, "kl": 2.0}
  teacher = {"perplexity": 10.0, "ppl_tokens": 100, "passkey": {"128": 1.0}}
  for name, ev in (("a", {"teacher": teacher, "x_step0": row}),
                   ("b", {"teacher": dict(teacher), "sliding window": dict(row, kl=0.3)}),
                   ("c", {"teacher": dict(teacher, perplexity=10.5)}),
                   ("e", {"teacher": dict(teacher, perplexity=10.0 * (1 + 1e-8)),
                          "other run": dict(row)}),
                   ("d", {"x_step0": dict(row, perplexity=41.0)}),
                   ("f", {"teacher": dict(teacher), "x_step0": dict(row)})):
    (tmp_path / f"{name}.json").write_text(json.dumps(ev))
  out = str(tmp_path / "m")
  text = summary.main(["--eval", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                       "--runs", str(d), "--out", out])
  names = [l.split(" | ")[0][2:] for l in text.splitlines()[2:]]
  assert names == ["teacher", "sliding window", "x_step0"]
  assert "| x_step0 | 0 | 0.2 min | 40.00 | 4.000 |" in text
  assert (tmp_path / "m.png").exists()
  # the 8th digit of the teacher's perplexity (float reassociation) does not matter
  summary.main(["--eval", str(tmp_path / "a.json"), str(tmp_path / "e.json"), "--out", out])
  with pytest.raises(ValueError, match="score the teacher differently"):
    summary.main(["--eval", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", out])
  with pytest.raises(ValueError, match="'x_step0' is in .* with different scores"):
    summary.main(["--eval", str(tmp_path / "a.json"), str(tmp_path / "d.json"), "--out", out])
  # the same model scored the same in two runs (a baseline both evaluated) joins once
  text = summary.main(["--eval", str(tmp_path / "a.json"), str(tmp_path / "f.json"),
                       "--out", out])
  assert [l.split(" | ")[0][2:] for l in text.splitlines()[2:]] == ["teacher", "x_step0"]


def test_recipe_summary_of_several_trainer_evaluations(tmp_path):
  """Two runs' own end-of-run evaluation.json (each names its model "student") merge under
  their workdirs' names, the teacher rows checked equal."""
  import json

  from linjax.linearize import summary
  teacher = {"perplexity": 10.0, "ppl_tokens": 100, "passkey": {"128": 1.0}}
  runs = []
  for name, top1 in (("run_60m", 0.9), ("run_15m", 0.8)):
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"stages": [{"stage": "s", "tokens": 100}],
                                                "wall_s": 60.0}))
    (d / "evaluation.json").write_text(json.dumps(
        {"teacher": teacher, "student": {"perplexity": 12.0, "ppl_ratio": 1.2,
                                         "top1_agreement": top1, "kl": 0.1}}))
    runs.append(str(d))
  text = summary.main(["--eval", *(r + "/evaluation.json" for r in runs), "--runs", *runs,
                       "--out", str(tmp_path / "m")])
  assert "| run_60m | 100 | 1.0 min | 12.00 | 1.200 | 0.900 |" in text
  assert "| run_15m | 100 | 1.0 min | 12.00 | 1.200 | 0.800 |" in text
  assert "student" not in text


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


def test_trainer_method_fields_reach_every_mixer_and_the_export(tmp_path):
  """`--config.model.method` / `--config.model.attention_method` (what the CLI overrides set)
  end up on every linear and softmax layer of the trained model and in its exported config."""
  from linjax.train import base_config, stage, stages, train
  c = base_config()
  c.data.embedded_split, c.data.max_rows, c.progress = "pydoc", 4, False
  c.linearize = {"mixer": "gla", "layers": [0]}
  c.model.method, c.model.attention_method = "assoc_scan", "parallel"
  c.stages = stages(ft=stage(steps=1, seq_len=32, batch_size=2, trainable="all",
                             objective={"ce": 1.0}, ckpt_every=0))
  s = train(c, str(tmp_path / "w"))
  assert [l.self_attn.method for l in s["model"].layers] == ["assoc_scan", "parallel"]
  back, _ = linjax.from_pretrained(str(tmp_path / "w"), tokenizer=False)
  assert [l.self_attn.method for l in back.layers] == ["assoc_scan", "parallel"]
