"""The trainer: smoke runs per trainable kind, stage-wise init_from, frozen params, NaN guard,
config errors, SIGKILL + resume == uninterrupted, and 8 fake devices == 1 device."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from linjax.layers.params import LoRAParam
from linjax.train import checkpoints as ckpt_lib
from linjax.train.config import ConfigError, base_config, resolve
from linjax.train.trainer import NonFiniteLossError, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**over):
  """2-step tiny-Llama run on the embedded pydoc text, byte tokenizer, short rows."""
  c = base_config()
  c.model.source = "tiny"
  c.data.tokenizer = "byte"
  c.data.embedded_split = "pydoc"
  c.data.seq_len = 32
  c.data.batch_size = 4
  c.data.max_rows = 64
  c.data.eval_rows = 4
  c.steps = 2
  c.log_every = 1
  c.progress = False
  c.ckpt.every = 0
  c.ckpt.export = False
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 0
  for k, v in over.items():
    node = c
    *parts, last = k.split(".")
    for p in parts:
      node = node[p]
    node[last] = v
  return c


def flat_params(model, flt=nnx.Param):
  return {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
          for p, v in nnx.to_flat_state(nnx.state(model, flt))}


def _subprocess_env(devices=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


# ------------------------------------------------------------------------------------------
# Config errors: named, before any compute


def test_config_errors_name_the_field_or_path(tmp_path):
  with pytest.raises(ConfigError, match=r"optim\.lr_peak"):
    resolve({"optim": {"lr_peak": 1.0}})
  with pytest.raises(ConfigError, match=r"'stepz'"):
    resolve({"stepz": 3})
  with pytest.raises(ConfigError, match=r"model\.tiny\.hiden_size"):
    resolve({"model": {"tiny": {"hiden_size": 8}}})
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(ConfigError, match=r"data\.path.*nope\.jsonl"):
    resolve({"data": {"path": missing}})
  with pytest.raises(ConfigError, match=r"init_from.*nowhere"):
    resolve({"init_from": str(tmp_path / "nowhere")})
  with pytest.raises(ConfigError, match=r"model\.source.*absent"):
    resolve({"model": {"source": str(tmp_path / "absent")}})
  with pytest.raises(ConfigError, match=r"trainable"):
    resolve({"trainable": "lora+wings"})
  with pytest.raises(ConfigError, match=r"loss\.name"):
    resolve({"loss": {"name": "no_such_loss"}})
  with pytest.raises(ConfigError, match=r"loss\.temperature"):
    resolve({"loss": {"name": "ce", "temperature": 2.0}})
  with pytest.raises(ConfigError, match=r"grad_accum"):
    resolve({"optim": {"grad_accum": 3}, "data": {"batch_size": 4}})
  # train() fails on the config before creating a workdir or touching a model
  wd = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"ckpt\.evry"):
    train({"ckpt": {"evry": 1}}, str(wd))
  assert not wd.exists()


def test_cli_rejects_unknown_override(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "linjax.train", "--config",
       os.path.join(ROOT, "experiments", "tiny_llama.py:smoke"), "--workdir", str(tmp_path / "w"),
       "--config.optim.lr_peak=1"],
      capture_output=True, text=True, env=_subprocess_env(), cwd=ROOT, timeout=300)
  assert r.returncode != 0
  assert "lr_peak" in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------
# Smoke runs per trainable kind


def _check_outputs(wd, summary, steps):
  for f in ("summary.json", "loss_curve.png", "metrics.jsonl"):
    assert os.path.exists(os.path.join(wd, f)), f
  assert os.listdir(os.path.join(wd, "tensorboard"))
  with open(os.path.join(wd, "summary.json")) as f:
    s = json.load(f)
  assert s["steps"] == steps and np.isfinite(s["final_loss"]) and np.isfinite(s["eval_loss"])
  assert summary["eval_ppl"] == pytest.approx(np.exp(summary["eval_loss"]))


def test_stagewise_full_then_lora_from_previous_stage(tmp_path):
  """Stage 1 trains every weight and exports; stage 2 starts from it (init_from = the stage-1
  workdir) and trains LoRA adapters only (with dropout and grad accumulation)."""
  wd1, wd2 = str(tmp_path / "s1"), str(tmp_path / "s2")
  s1 = train(tiny_config(**{"ckpt.export": True}), wd1)
  _check_outputs(wd1, s1, 2)
  assert s1["trainable_params"] == s1["total_params"]
  stage1 = flat_params(s1["model"])

  c2 = tiny_config(**{"init_from": wd1, "trainable": "lora", "lora.rank": 2,
                      "lora.dropout": 0.1, "optim.grad_accum": 2, "ckpt.every": 1,
                      "ckpt.trainable_only": True})
  s2 = train(c2, wd2)
  _check_outputs(wd2, s2, 2)
  m2 = s2["model"]   # export is off: the adapters are still unmerged
  assert 0 < s2["trainable_params"] < s2["total_params"]
  after = flat_params(m2)
  lora = flat_params(m2, LoRAParam)
  assert lora and any(np.abs(v).max() > 0 for k, v in lora.items() if k.endswith("lora_b"))
  # every non-LoRA weight is exactly stage 1's (frozen, untouched by the optimizer)
  for k, v in stage1.items():
    k2 = k.replace("q_proj.", "q_proj.base.").replace("k_proj.", "k_proj.base.") \
          .replace("v_proj.", "v_proj.base.").replace("o_proj.", "o_proj.base.")
    np.testing.assert_array_equal(after[k2], v, err_msg=k)
  # trainable_only checkpoints hold the adapters (+ dropout RNG state), no frozen weight
  ck = ckpt_lib.Checkpointer(os.path.join(wd2, "checkpoints"))
  names = ck.saved_keys(2, "model")
  ck.close()
  assert names and all("lora_" in n or "rngs" in n for n in names), names
  assert any("lora_b" in n for n in names)
  # ... and a run resumes from them (frozen weights come from init_from again)
  c2.steps = 3
  s3 = train(c2, wd2)
  assert s3["resumed_from"] == 2 and np.isfinite(s3["final_loss"])


def test_trainable_norms_only_leaves_the_rest_frozen(tmp_path):
  c = tiny_config(trainable="norms")
  init = resolve(c)
  from linjax.parallel.mesh import make_mesh
  from linjax.train.trainer import prepare_model
  before = flat_params(prepare_model(init, make_mesh(init.mesh)))
  s = train(c, str(tmp_path / "w"))
  after = flat_params(s["model"])
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all("norm" in k for k in changed), changed
  assert s["trainable_params"] < s["total_params"]


@pytest.mark.parametrize("kind", ["feature_maps", "lora+feature_maps"])
def test_feature_map_kinds(tmp_path, kind):
  """Train only what linearizing added (LoLCATs feature maps, window factors), with or
  without LoRA, on a tiny Llama linearized by `config.linearize`."""
  lin = pytest.importorskip("linjax.linearize")
  if not hasattr(lin, "linearize"):
    pytest.skip("linjax.linearize.linearize is not available yet")
  from linjax.layers.params import FeatureMapParam
  c = tiny_config(trainable=kind, **{"lora.rank": 2})
  c.linearize = {"mixer": "lolcats"}
  s = train(c, str(tmp_path / "w"))
  m = s["model"]
  assert set(m.config.mixers) == {"lolcats"}
  fm = flat_params(m, FeatureMapParam)
  assert fm and np.isfinite(s["final_loss"])
  assert s["trainable_params"] == sum(v.size for v in fm.values()) + (
      sum(v.size for v in flat_params(m, LoRAParam).values()) if "lora" in kind else 0)


def test_nan_guard_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  wd = str(tmp_path / "w")
  c = tiny_config(steps=6, debug_nan_at_step=3, **{"ckpt.every": 2, "ckpt.async_save": False})
  with pytest.raises(NonFiniteLossError, match=r"at step 3\b.*step 2"):
    train(c, wd)
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"))
  assert ck.all_steps() == [2]
  assert np.isfinite(ck.read_meta(2)["loss"])
  ck.close()


# ------------------------------------------------------------------------------------------
# SIGKILL mid-run (right after an async save was issued) + restart == uninterrupted


def _cli(wd, *overrides, devices=None):
  cmd = [sys.executable, "-m", "linjax.train", "--config",
         os.path.join(ROOT, "experiments", "tiny_llama.py:smoke"), "--workdir", wd,
         "--config.steps=6", "--config.ckpt.every=2", "--config.data.seq_len=32",
         "--config.data.batch_size=4", "--config.data.embedded_split=pydoc",
         "--config.progress=False", "--config.optim.lr=0.01", "--config.log_every=1", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(devices),
                        cwd=ROOT, timeout=600)


def _load_export(wd):
  from linjax.convert import load_linjax
  return flat_params(load_linjax(os.path.join(wd, "model")))


def test_sigkill_and_resume_gives_identical_parameters(tmp_path):
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  r = _cli(ref)
  assert r.returncode == 0, r.stderr[-3000:]
  # killed right after issuing the (asynchronous) save of step 4
  r = _cli(killed, "--config.debug_kill_at_step=4")
  assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
  steps_dir = os.path.join(killed, "checkpoints")
  left = sorted(os.listdir(steps_dir))
  assert not os.path.exists(os.path.join(killed, "summary.json"))
  r = _cli(killed)   # the same command again: resumes from the last complete checkpoint
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout[r.stdout.index("{"):])
  # either the step-4 save completed before the kill, or it left only a temporary dir
  assert summary["resumed_from"] == (4 if "4" in left else 2), (summary["resumed_from"], left)
  assert all(d.isdigit() or ".orbax-checkpoint-tmp" in d for d in left), left
  a, b = _load_export(ref), _load_export(killed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # the resumed run's metrics cover every step
  steps = {json.loads(l)["step"] for l in open(os.path.join(killed, "metrics.jsonl"))}
  assert set(range(1, 7)) <= steps


def test_incomplete_checkpoint_is_ignored_and_checkpoints_seed_the_next_stage(tmp_path):
  """A save cut short leaves only orbax's temporary directory, which is ignored; a workdir
  without an exported model still serves as `init_from` (its latest checkpoint)."""
  wd = str(tmp_path / "w")
  c = tiny_config(trainable="lora", **{"ckpt.every": 1, "ckpt.async_save": False,
                                       "lora.rank": 2})
  s = train(c, wd)
  d = os.path.join(wd, "checkpoints")
  os.makedirs(os.path.join(d, "7.orbax-checkpoint-tmp-1234", "model"))   # a half-written save
  ck = ckpt_lib.Checkpointer(d)
  assert ck.latest_step() == 2
  ck.close()
  from linjax.layers.lora import merge_lora
  merge_lora(s["model"])
  want = flat_params(s["model"])
  from linjax.parallel.mesh import make_mesh
  from linjax.train.trainer import prepare_model
  nxt = resolve(tiny_config(init_from=wd))
  got = flat_params(prepare_model(nxt, make_mesh(nxt.mesh)))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  with pytest.raises(ConfigError, match="init_from"):
    resolve(tiny_config(init_from=str(tmp_path)))     # neither a model nor a run


# ------------------------------------------------------------------------------------------
# 8 fake CPU devices (data x fsdp mesh) == 1 device

_MULTI = r"""
import json, sys, numpy as np, jax
from flax import nnx
sys.path.insert(0, {root!r})
from tests.test_train import tiny_config, flat_params
from linjax.train.trainer import train
assert jax.device_count() == 8, jax.devices()
c = tiny_config(**{{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "data.batch_size": 8,
                    "optim.grad_accum": 2}})
s = train(c, {wd!r})
np.savez({out!r}, **flat_params(s["model"]))
print(json.dumps({{"loss": s["final_loss"], "eval": s["eval_loss"], "mesh": s["mesh"]}}))
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
  s1 = train(tiny_config(**{"data.batch_size": 8}), str(tmp_path / "w1"))
  p1, p8 = flat_params(s1["model"]), dict(np.load(out))
  assert p1.keys() == p8.keys()
  assert res8["loss"] == pytest.approx(s1["final_loss"], rel=1e-5)
  assert res8["eval"] == pytest.approx(s1["eval_loss"], rel=1e-5)
  from tests.helpers import rel_err
  for k in p1:
    assert rel_err(p1[k], p8[k]) < 1e-4, (k, rel_err(p1[k], p8[k]))


# ------------------------------------------------------------------------------------------
# Optimizer pieces


def test_schedules_clipping_and_reduce_on_plateau():
  import jax.numpy as jnp
  from linjax.train.optim import lr_schedule, make_optimizer, plateau_scale
  c = base_config().optim
  c.lr, c.warmup_steps, c.min_lr_ratio = 0.1, 2, 0.1
  cos = lr_schedule(c, 10)
  assert float(cos(0)) == 0.0 and float(cos(2)) == pytest.approx(0.1)
  assert float(cos(10)) == pytest.approx(0.01)
  c.schedule = "constant"
  assert float(lr_schedule(c, 10)(1)) == pytest.approx(0.05)
  assert float(lr_schedule(c, 10)(7)) == pytest.approx(0.1)
  c.schedule, c.warmup_steps, c.weight_decay, c.clip_norm = "plateau", 0, 0.0, 1.0
  c.plateau.patience, c.plateau.factor = 1, 0.5
  tx, _ = make_optimizer(c, 10)
  lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(lin, tx, wrt=nnx.Param)
  big = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), nnx.state(lin, nnx.Param))
  k0 = np.asarray(lin.kernel.get_value())
  opt.update(lin, big, value=jnp.float32(1.0))
  # clipped to global norm 1, Adam's first step moves every weight by ~lr
  np.testing.assert_allclose(np.asarray(lin.kernel.get_value()) - k0, -0.1, rtol=1e-3)
  assert float(plateau_scale(opt.opt_state)) == 1.0
  for _ in range(4):   # the loss does not improve: the scale halves after `patience` steps
    opt.update(lin, big, value=jnp.float32(1.0))
  assert float(plateau_scale(opt.opt_state)) < 1.0
