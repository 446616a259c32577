"""The one training loop: stages, budgets, frozen params, NaN guard, config errors, SIGKILL in
either stage + resume == uninterrupted, a changed config refused on resume, and 8 fake
devices == 1 device."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from linjax.layers.params import FeatureMapParam, LoRAParam
from linjax.train.config import ConfigError, base_config, resolve, stage, stages
from linjax.train.trainer import NonFiniteLossError, train
from tests.helpers import override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**stage_over):
  """A one-stage 2-step tiny-Llama run on the embedded pydoc text, byte tokenizer."""
  c = base_config()
  c.model.source = "tiny"
  c.data.tokenizer = "byte"
  c.data.embedded_split = "pydoc"
  c.data.max_rows = 64
  c.progress = False
  c.ckpt.export = False
  st = stage(steps=2, seq_len=32, batch_size=4, eval_rows=4, log_every=1, ckpt_every=0,
             optim={"lr": 1e-2})
  c.stages = stages(train=override(st, **stage_over))
  return c


def two_stages(**over):
  """LoLCATs on a tiny Llama: attention transfer of the feature maps, then LoRA + KL."""
  c = tiny_config()
  c.linearize = {"mixer": "lolcats", "window": 8}
  c.stages = stages(
      transfer=stage(steps=4, seq_len=32, batch_size=2, trainable="feature_maps",
                     objective={"attention_mse": 1.0}, transfer_scale=100.0, log_every=1,
                     ckpt_every=2, optim={"lr": 1e-2, "schedule": "constant"}),
      finetune=stage(steps=4, seq_len=32, batch_size=2, trainable="lora",
                     objective={"kl": 1.0, "ce": 0.5}, lora={"rank": 2}, log_every=1,
                     ckpt_every=2, eval_every=2, eval_rows=2, keep_best=True,
                     optim={"lr": 1e-2}))
  return override(c, **over)


def flat_params(model, flt=nnx.Param):
  return {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
          for p, v in nnx.to_flat_state(nnx.state(model, flt))}


def _subprocess_env(devices=None):
  from tests.helpers import subprocess_env
  return subprocess_env(devices)


# ------------------------------------------------------------------------------------------
# Config errors: named, before any compute


def test_config_errors_name_the_field_or_path(tmp_path):
  s = lambda **kw: {"stages": {"train": kw}}
  with pytest.raises(ConfigError, match=r"stages\.train\.optim\.lr_peak"):
    resolve(s(optim={"lr_peak": 1.0}))
  with pytest.raises(ConfigError, match=r"'stepz'"):
    resolve({"stepz": 3})
  with pytest.raises(ConfigError, match=r"model\.tiny\.hiden_size"):
    resolve({"model": {"tiny": {"hiden_size": 8}}})
  with pytest.raises(ConfigError, match=r"data\.path.*nope\.jsonl"):
    resolve({"data": {"path": str(tmp_path / "nope.jsonl")}})
  with pytest.raises(ConfigError, match=r"init_from.*nowhere"):
    resolve({"init_from": str(tmp_path / "nowhere")})
  with pytest.raises(ConfigError, match=r"model\.source.*absent"):
    resolve({"model": {"source": str(tmp_path / "absent")}})
  with pytest.raises(ConfigError, match=r"stages\.train\.trainable"):
    resolve(s(trainable="lora+wings"))
  with pytest.raises(ConfigError, match=r"stages\.train\.objective.*'klx'"):
    resolve(s(objective={"klx": 1.0}))
  with pytest.raises(ConfigError, match=r"no term with a non-zero weight"):
    resolve(s(objective={"ce": 0.0}))
  with pytest.raises(ConfigError, match=r"stages\.train\.grad_accum"):
    resolve(s(grad_accum=3, batch_size=4))
  with pytest.raises(ConfigError, match=r"linearize.*'windw'"):
    resolve({"linearize": {"mixer": "lolcats", "windw": 8}})
  with pytest.raises(ConfigError, match=r"debug_kill_at"):
    resolve({"debug_kill_at": "nostage:3"})
  with pytest.raises(ConfigError, match=r"model\.method"):
    resolve({"model": {"method": "flash"}})
  # train() fails on the config before creating a workdir or touching a model
  wd = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"ckpt\.evry"):
    train({"ckpt": {"evry": 1}}, str(wd))
  assert not wd.exists()


def test_cli_rejects_unknown_override(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "linjax.train", "--config",
       os.path.join(ROOT, "experiments", "tiny_llama.py:smoke"), "--workdir", str(tmp_path / "w"),
       "--config.stages.train.optim.lr_peak=1"],
      capture_output=True, text=True, env=_subprocess_env(), cwd=ROOT, timeout=300)
  assert r.returncode != 0
  assert "lr_peak" in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_stage_order_is_the_order_given():
  c = resolve({"stages": {"b_second": {"order": 1}, "a_first": {"order": 0}}})
  from linjax.train.config import ordered_stages
  assert [n for n, _ in ordered_stages(c)] == ["a_first", "b_second"]
  st = stages(zeta=stage(), alpha=stage())
  assert [n for n, _ in ordered_stages(resolve({"stages": st.to_dict()}))] == ["zeta", "alpha"]


# ------------------------------------------------------------------------------------------
# Two stages: what trains, what is written


def test_two_stages_train_what_they_name_and_write_their_outputs(tmp_path):
  wd = str(tmp_path / "w")
  s = train(two_stages(**{"ckpt.export": True}), wd)
  m = s["model"]
  assert set(m.config.mixers) == {"lolcats"}
  st1, st2 = s["stages"]
  assert (st1["stage"], st2["stage"]) == ("transfer", "finetune")
  assert st1["steps"] == 4 and st2["steps"] == 4
  assert st1["trainable_params"] == sum(v.size for v in flat_params(m, FeatureMapParam).values())
  assert np.isfinite(st1["final_loss"]) and np.isfinite(st2["val_loss"])
  assert st2["best"] is not None and st2["best"]["step"] in (2, 4)
  for sub in ("0_transfer", "1_finetune"):
    d = os.path.join(wd, "stages", sub)
    for f in ("DONE", "metrics.jsonl", "loss_curve.png"):
      assert os.path.exists(os.path.join(d, f)), (sub, f)
    assert os.listdir(os.path.join(d, "tensorboard"))
  for f in ("summary.json", "loss_curve.png", "config.json"):
    assert os.path.exists(os.path.join(wd, f)), f
  rows = [json.loads(l) for l in open(os.path.join(wd, "stages", "1_finetune", "metrics.jsonl"))]
  assert {r["step"] for r in rows if r["split"] == "train"} == {1, 2, 3, 4}
  assert {"kl", "ce", "loss", "grad_norm", "lr"} <= set(rows[0])
  # the export reloads and gives the trained model's logits
  import linjax
  loaded, _ = linjax.from_pretrained(wd, tokenizer=False)      # a workdir: its model/
  toks = np.arange(1, 33, dtype=np.int32)[None] % 250
  np.testing.assert_allclose(np.asarray(loaded(toks)[0]), np.asarray(m(toks)[0]),
                             rtol=1e-5, atol=1e-5)


def test_frozen_parameters_stay_frozen(tmp_path):
  """A feature-map stage moves only the feature maps / window factors; a LoRA stage moves
  no base weight (the adapters are merged at its end, so only the LoRA targets change)."""
  c = two_stages()
  c.stages.finetune.lora.merge_after = False
  from linjax.parallel.mesh import make_mesh
  from linjax.train.trainer import prepare_models
  init, _ = prepare_models(resolve(c), make_mesh(resolve(c).mesh), [])
  before = flat_params(init)
  s = train(c, str(tmp_path / "w"))
  after = flat_params(s["model"])
  lora = flat_params(s["model"], LoRAParam)
  assert lora and any(np.abs(v).max() > 0 for k, v in lora.items() if k.endswith("lora_b"))
  fm_keys = set(flat_params(init, FeatureMapParam))
  for k, v in before.items():
    k2 = k
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
      k2 = k2.replace(f"{p}.", f"{p}.base.")
    if k in fm_keys:
      assert not np.array_equal(after[k], v), f"{k} did not train"
    else:
      np.testing.assert_array_equal(after[k2], v, err_msg=k)


def test_budgets_in_tokens_and_time(tmp_path):
  s = train(tiny_config(steps=100, tokens=3 * 4 * 32), str(tmp_path / "a"))
  assert s["stages"][0]["steps"] == 3                 # 3 steps of 4 x 32 tokens
  s = train(tiny_config(steps=10000, time_budget_s=2.0), str(tmp_path / "b"))
  assert 1 < s["stages"][0]["steps"] < 10000
  assert s["stages"][0]["train_seconds"] >= 2.0


def test_nan_guard_stops_naming_the_stage_and_step(tmp_path):
  wd = str(tmp_path / "w")
  c = tiny_config(steps=6, ckpt_every=2)
  c.debug_nan_at = "train:3"
  c.ckpt.async_save = False
  with pytest.raises(NonFiniteLossError, match=r"stage 'train' at step 3\b.*step 2"):
    train(c, wd)


def test_resume_with_a_changed_config_is_refused_naming_the_fields(tmp_path):
  wd = str(tmp_path / "w")
  train(tiny_config(), wd)
  c = tiny_config()
  c.stages.train.optim.lr = 0.1
  c.stages.train.seq_len = 64
  with pytest.raises(ConfigError, match=r"stages\.train\.optim\.lr.*stages\.train\.seq_len|"
                                        r"stages\.train\.seq_len.*stages\.train\.optim\.lr"):
    train(c, wd)
  c.allow_config_change = True
  train(c, wd)                 # explicitly allowed
  c2 = tiny_config(log_every=2)
  c2.progress = True           # fields that do not change the computation may differ freely
  train(c2, wd)


# ------------------------------------------------------------------------------------------
# SIGKILL in either stage + the same command again == uninterrupted


def _cli(wd, *overrides, devices=None):
  cmd = [sys.executable, "-m", "linjax.train", "--config",
         os.path.join(ROOT, "experiments", "lolcats_smollm2.py:smoke"), "--workdir", wd,
         "--config.progress=False", "--config.stages.transfer.ckpt_every=2",
         "--config.stages.finetune.ckpt_every=2", "--config.stages.transfer.steps=4",
         "--config.stages.finetune.steps=4", "--config.stages.transfer.log_every=1",
         "--config.stages.finetune.log_every=1", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(devices),
                        cwd=ROOT, timeout=900)


def _load_export(wd):
  from linjax.convert import load_linjax
  return flat_params(load_linjax(os.path.join(wd, "model")))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  ref = str(tmp_path_factory.mktemp("ref") / "run")
  r = _cli(ref)
  assert r.returncode == 0, r.stderr[-3000:]
  return ref


@pytest.mark.parametrize("kill", [pytest.param("transfer:3", marks=pytest.mark.slow),
                                  "finetune:2"])
def test_sigkill_in_a_stage_and_resume_gives_identical_parameters(tmp_path, kill, reference_run):
  """Killed mid-stage (after a checkpoint of that stage was issued), the same command
  resumes: finished stages are restored, the current one continues from its last complete
  checkpoint, and the exported parameters equal an uninterrupted run's bit for bit."""
  ref = reference_run
  killed = str(tmp_path / "killed")
  r = _cli(killed, f"--config.debug_kill_at={kill}")
  assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
  assert not os.path.exists(os.path.join(killed, "summary.json"))
  r = _cli(killed)   # the command again (without the kill): resumes
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = _load_export(ref), _load_export(killed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  stage_dir = os.path.join(killed, "stages", "0_transfer" if kill.startswith("t") else "1_finetune")
  steps = [json.loads(l)["step"] for l in open(os.path.join(stage_dir, "metrics.jsonl"))
           if json.loads(l)["split"] == "train"]
  assert sorted(steps) == [1, 2, 3, 4], steps      # each step logged once


# ------------------------------------------------------------------------------------------
# 8 fake CPU devices (data x fsdp mesh) == 1 device

_MULTI = r"""
import json, sys, numpy as np, jax
sys.path.insert(0, {root!r})
from tests.test_train import tiny_config, flat_params
from linjax.train.trainer import train
assert jax.device_count() == 8, jax.devices()
c = tiny_config(batch_size=8, grad_accum=2)
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
s = train(c, {wd!r})
np.savez({out!r}, **flat_params(s["model"]))
st = s["stages"][0]
print(json.dumps({{"loss": st["final_loss"], "val": st["val_loss"], "mesh": s["mesh"]}}))
"""


def test_eight_fake_devices_match_one_device(tmp_path):
  """A 2x2x2 (data, fsdp, tensor) mesh with 2 accumulated micro-batches gives the parameters
  of one device taking the whole batch at once (fp32 tolerance)."""
  out = str(tmp_path / "p8.npz")
  code = _MULTI.format(root=ROOT, wd=str(tmp_path / "w8"), out=out)
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     env=_subprocess_env(devices=8), cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res8 = json.loads(r.stdout.strip().splitlines()[-1])
  assert res8["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "seq": 1}
  s1 = train(tiny_config(batch_size=8), str(tmp_path / "w1"))
  p1, p8 = flat_params(s1["model"]), dict(np.load(out))
  assert p1.keys() == p8.keys()
  assert res8["loss"] == pytest.approx(s1["stages"][0]["final_loss"], rel=1e-5)
  assert res8["val"] == pytest.approx(s1["stages"][0]["val_loss"], rel=1e-5)
  from tests.helpers import rel_err
  for k in p1:
    assert rel_err(p1[k], p8[k]) < 1e-4, (k, rel_err(p1[k], p8[k]))


# ------------------------------------------------------------------------------------------
# Optimizer pieces


def test_learning_rate_schedules_clipping_and_reduce_on_plateau():
  import jax.numpy as jnp
  from linjax.train.optim import (learning_rate, make_optimizer, plateau_scale,
                                  set_learning_rate)
  c = stage().optim
  c.lr, c.warmup_steps, c.min_lr_ratio = 0.1, 2, 0.1
  assert learning_rate(c, 0, 0.0) == pytest.approx(0.05)
  assert learning_rate(c, 2, 0.0) == pytest.approx(0.1)
  assert learning_rate(c, 5, 0.5) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))
  assert learning_rate(c, 9, 1.0) == pytest.approx(0.01)
  assert learning_rate(c, 9, 2.0) == pytest.approx(0.01)   # a budget overrun stays at the floor
  c.schedule = "constant"
  assert learning_rate(c, 7, 0.9) == pytest.approx(0.1)
  c.schedule, c.warmup_steps, c.weight_decay, c.clip_norm = "plateau", 0, 0.0, 1.0
  c.plateau.patience, c.plateau.factor = 1, 0.5
  lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(lin, make_optimizer(c), wrt=nnx.Param)
  set_learning_rate(opt, 0.1)
  big = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), nnx.state(lin, nnx.Param))
  k0 = np.asarray(lin.kernel.get_value())
  opt.update(lin, big, value=jnp.float32(1.0))
  # clipped to global norm 1, Adam's first step moves every weight by ~lr
  np.testing.assert_allclose(np.asarray(lin.kernel.get_value()) - k0, -0.1, rtol=1e-3)
  assert float(plateau_scale(opt.opt_state)) == 1.0
  for _ in range(4):   # the loss does not improve: the scale halves after `patience` steps
    opt.update(lin, big, value=jnp.float32(1.0))
  assert float(plateau_scale(opt.opt_state)) < 1.0
