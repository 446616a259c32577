"""Checkpoints that cannot lie: per-array checksums verified on restore, damaged steps named
in one line and skipped, the resume-config check, and metrics rows rewritten on resume.
Every damage is done to a real orbax checkpoint on disk."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from linjax.train import checkpoints as ck_lib
from linjax.train.checkpoints import (Checkpointer, CheckpointCorruptError, ResumeConfigError,
                                      check_resume_config)
from linjax.train.config import base_config
from linjax.train.metrics import MetricsWriter
from tests.helpers import override

# orbax leaves an unawaited read coroutine behind when tensorstore fails a read
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class Tiny(nnx.Module):
  def __init__(self, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    self.w = nnx.Param(jax.random.normal(k1, (64, 48)))              # compressible? no: random
    self.b = nnx.Param(jax.random.normal(k2, (48,)).astype(jnp.bfloat16))
    self.rngs = nnx.Rngs(seed)                                        # a PRNG key + counter


def states(seed=0):
  m = Tiny(seed)
  return m, nnx.state(m), nnx.state(m, nnx.Param)


def write_steps(d, steps=(1, 2, 3)):
  ck = Checkpointer(d, keep=10, async_save=False)
  for s in steps:
    _, ms, os_ = states(seed=s)
    ck.save(s, ms, os_, {"step": s, "config": {"optim": {"lr": 0.1 * s}}})
  ck.close()


def data_files(d, step, item="model"):
  """The OCDBT data files of one item of one step, largest first."""
  root = os.path.join(d, str(step), item)
  out = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs
         if os.sep + "d" + os.sep in os.path.join(r, f) + os.sep and "ocdbt.process" in r]
  return sorted(out, key=os.path.getsize, reverse=True)


def restore_into_fresh(d, step):
  _, ms, os_ = states(seed=99)          # other numbers, so a no-op restore would show
  ck = Checkpointer(d, async_save=False)
  try:
    return ck.restore(step, ms, os_)
  finally:
    ck.close()


def leaf(state, name):
  return np.asarray(jax.device_get(dict(nnx.to_flat_state(state))[(name,)].get_value()))


def test_roundtrip_checks_every_array(tmp_path):
  d = str(tmp_path / "ck")
  write_steps(d, (1, 2))
  ms, os_, meta = restore_into_fresh(d, 2)
  _, want, _ = states(seed=2)
  for name in ("w", "b"):
    np.testing.assert_array_equal(leaf(ms, name), leaf(want, name))
  assert meta["step"] == 2
  saved = json.load(open(os.path.join(d, "2", "checksums", "metadata")))
  assert saved["algorithm"] == ck_lib.CHECKSUM_ALGORITHM
  assert set(saved["model"]) >= {"w", "b"} and any("rngs" in k for k in saved["model"])
  assert saved["model"]["b"]["dtype"] == "bfloat16"
  # the checksum is that of the numpy bytes, and changes with the last bit of one element
  w = leaf(want, "w")
  assert saved["model"]["w"]["sum"] == ck_lib.array_checksum_np(w)
  w2 = w.copy()
  w2[17, 5] = np.nextafter(w2[17, 5], np.inf)
  assert ck_lib.array_checksum_np(w2) != saved["model"]["w"]["sum"]
  w3 = w.copy()
  w3[[0, 1]] = w3[[1, 0]]                                     # two rows swapped
  assert ck_lib.array_checksum_np(w3) != saved["model"]["w"]["sum"]
  ck = Checkpointer(d, async_save=False)
  assert ck.verify(1) is None and ck.verify(2) is None
  ck.close()


def _assert_one_line(err, step, *words):
  msg = str(err)
  assert "\n" not in msg and len(msg) < 700, msg
  assert f"step {step}" in msg, msg
  for w in words:
    assert w in msg, (w, msg)


def test_truncated_newest_step_is_named_and_skipped(tmp_path):
  d = str(tmp_path / "ck")
  write_steps(d)
  f = data_files(d, 3)[0]
  size = os.path.getsize(f)
  with open(f, "r+b") as fh:
    fh.truncate(size // 3)
  with pytest.raises(CheckpointCorruptError) as e:
    restore_into_fresh(d, 3)
  _assert_one_line(e.value, 3, "model")
  assert e.value.step == 3
  _, ms, os_ = states(seed=99)
  ck = Checkpointer(d, async_save=False)
  assert ck.latest_step() == 3                      # orbax still calls it complete
  with pytest.warns(UserWarning, match="step 3"):
    step, ms, os_, meta = ck.restore_latest_intact(ms, os_)
  assert step == 2 and meta["step"] == 2
  assert [s for s, _ in ck.skipped] == [3] and "model" in ck.skipped[0][1]
  _, want, _ = states(seed=2)
  np.testing.assert_array_equal(leaf(ms, "w"), leaf(want, "w"))
  assert ck.verify(3) is not None and ck.verify(2) is None
  ck.close()


def test_flipped_bytes_that_orbax_reads_silently_are_caught(tmp_path):
  d = str(tmp_path / "ck")
  write_steps(d, (1, 2))
  f = data_files(d, 2)[0]
  b = bytearray(open(f, "rb").read())
  b[len(b) // 2] ^= 0x5A
  open(f, "wb").write(b)
  # orbax alone returns other numbers without an error
  _, ms, _ = states(seed=99)
  raw = ocp.StandardCheckpointer().restore(
      os.path.join(d, "2", "model"), ck_lib._abstract(ck_lib.pure(ms)))
  _, want, _ = states(seed=2)
  assert not (np.array_equal(np.asarray(raw["w"]), leaf(want, "w")) and
              np.array_equal(np.asarray(raw["b"]).astype(np.float32),
                             leaf(want, "b").astype(np.float32)))
  with pytest.raises(CheckpointCorruptError, match="checksum") as e:
    restore_into_fresh(d, 2)
  _assert_one_line(e.value, 2, "model")
  assert ("w (" in str(e.value)) or ("b (" in str(e.value))
  ck = Checkpointer(d, async_save=False)
  _, ms, os_ = states(seed=99)
  with pytest.warns(UserWarning):
    step, ms, _, _ = ck.restore_latest_intact(ms, os_)
  assert step == 1 and ck.skipped[0][0] == 2
  ck.close()


def test_missing_array_file_and_a_step_from_another_run(tmp_path):
  d = str(tmp_path / "ck")
  write_steps(d)
  for f in data_files(d, 3, "optimizer"):
    os.remove(f)
  with pytest.raises(CheckpointCorruptError) as e:
    restore_into_fresh(d, 3)
  _assert_one_line(e.value, 3, "optimizer")
  # step 2's model item replaced by step 1's: valid orbax data, the wrong numbers
  shutil.rmtree(os.path.join(d, "2", "model"))
  shutil.copytree(os.path.join(d, "1", "model"), os.path.join(d, "2", "model"))
  with pytest.raises(CheckpointCorruptError, match=r"model: 3 array\(s\).*w \(checksum"):
    restore_into_fresh(d, 2)
  ck = Checkpointer(d, async_save=False)
  _, ms, os_ = states(seed=99)
  with pytest.warns(UserWarning):
    step, *_ = ck.restore_latest_intact(ms, os_)
  assert step == 1 and [s for s, _ in ck.skipped] == [3, 2]
  # restore_model verifies too
  with pytest.raises(CheckpointCorruptError, match="step 2"):
    ck.restore_model(2, nnx.state(Tiny(99)))
  ck.close()


def test_every_step_damaged_raises_naming_the_newest(tmp_path):
  d = str(tmp_path / "ck")
  write_steps(d, (1, 2))
  for s in (1, 2):
    with open(data_files(d, s)[0], "r+b") as fh:
      fh.truncate(10)
  ck = Checkpointer(d, async_save=False)
  _, ms, os_ = states(seed=99)
  with pytest.warns(UserWarning), pytest.raises(CheckpointCorruptError, match=r"step 2.*\[1\]"):
    ck.restore_latest_intact(ms, os_)
  assert [s for s, _ in ck.skipped] == [2, 1]
  assert Checkpointer(str(tmp_path / "empty")).restore_latest_intact(ms, os_) is None
  ck.close()


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path):
  d = str(tmp_path / "ck")
  write_steps(d, (1,))
  shutil.rmtree(os.path.join(d, "1", "checksums"))
  with pytest.warns(UserWarning, match="no checksums"):
    ms, _, _ = restore_into_fresh(d, 1)
  _, want, _ = states(seed=1)
  np.testing.assert_array_equal(leaf(ms, "w"), leaf(want, "w"))


# ----------------------------------------------------------------------------- resume config

def _cfg(**over):
  """A run config as the trainer saves it (nested, JSON): the schema is the trainer's, so
  the check is written against a stand-in with the same kinds of fields."""
  c = {"seed": 0, "steps": 100, "log_every": 10, "progress": True,
       "model": {"source": "tiny", "method": None},
       "linearize": None, "trainable": "all",
       "lora": {"rank": 8, "targets": ("q_proj", "k_proj")},
       "data": {"seq_len": 512, "batch_size": 8, "eval_rows": 6},
       "optim": {"lr": 3e-4, "schedule": "cosine", "grad_accum": 1},
       "ckpt": {"every": 100, "keep": 3},
       "mesh": {"data": -1, "fsdp": 1},
       "stages": {"finetune": {"steps": 10, "log_every": 1,
                               "optim": {"lr": 1e-4, "schedule": "plateau"}}}}
  return override(c, **over)


def test_resume_config_names_the_fields_that_change_the_computation():
  saved = json.dumps(_cfg())                   # what the trainer stores in meta["config"]
  assert check_resume_config(saved, _cfg()) == []
  assert check_resume_config(base_config().to_json(), base_config()) == []   # ConfigDicts
  cur = _cfg(**{"optim.lr": 0.1, "data.seq_len": 64})
  with pytest.raises(ResumeConfigError) as e:
    check_resume_config(saved, cur)
  msg = str(e.value)
  assert "\n" not in msg
  assert "optim.lr: 0.0003 -> 0.1" in msg and "data.seq_len: 512 -> 64" in msg
  assert e.value.fields == ["data.seq_len: 512 -> 64", "optim.lr: 0.0003 -> 0.1"]
  # the explicit override returns them instead
  assert check_resume_config(saved, cur, allow=True) == e.value.fields
  # logging, checkpoint cadence, layout and kernel choice may change freely
  free = _cfg(**{"log_every": 1, "ckpt.every": 7, "ckpt.keep": 1, "mesh.fsdp": 2,
                 "model.method": "pallas", "progress": False, "data.eval_rows": 2,
                 "stages.finetune.log_every": 5})
  assert check_resume_config(saved, free) == []
  # more steps: a change under the cosine schedule, not under plateau / constant ones
  with pytest.raises(ResumeConfigError, match="steps: 100 -> 200"):
    check_resume_config(saved, _cfg(steps=200))
  assert check_resume_config(saved, _cfg(**{"stages.finetune.steps": 20})) == []
  with pytest.raises(ResumeConfigError, match="stages.finetune.optim.lr"):
    check_resume_config(saved, _cfg(**{"stages.finetune.optim.lr": 1.0}))
  const = json.dumps(_cfg(**{"optim.schedule": "constant"}))
  assert check_resume_config(const, _cfg(steps=200, **{"optim.schedule": "constant"})) == []
  assert check_resume_config(saved, _cfg(steps=200),
                             ignore=ck_lib.RESUME_IGNORED + ("steps",)) == []
  # free-form sub-trees and fields only one side has
  lin = _cfg(linearize={"mixer": "lolcats", "window": 64})
  with pytest.raises(ResumeConfigError, match=r"linearize.window: 64 -> 32"):
    check_resume_config(lin, _cfg(linearize={"mixer": "lolcats", "window": 32}))
  d = json.loads(saved)
  del d["optim"]["grad_accum"]
  with pytest.raises(ResumeConfigError, match=r"optim.grad_accum: \(absent\) -> 1"):
    check_resume_config(d, _cfg())
  # tuples and lists are the same value (JSON has no tuples)
  same = _cfg(**{"lora.targets": ["q_proj", "k_proj"]})
  assert check_resume_config(json.dumps(_cfg()), same) == []


# ----------------------------------------------------------------------------- metrics rows

def test_metrics_rows_after_the_restored_step_are_rewritten(tmp_path):
  wd = str(tmp_path)
  w = MetricsWriter(wd, 10, 0, progress=False)
  for s in range(1, 8):
    w.write(s, {"loss": 10.0 - s})
  w.write(6, {"loss": 1.0}, "eval")
  w.close()
  with open(w.jsonl, "a") as f:
    f.write('{"step": 8, "split": "tr')         # a line cut by the kill
  # the run died after step 7; the newest checkpoint is step 4
  w2 = MetricsWriter(wd, 10, 4, progress=False, resume_step=4)
  assert w2.dropped_rows == 5                   # steps 5, 6, 7, the eval row at 6, the cut line
  for s in range(5, 8):
    w2.write(s, {"loss": 100.0 + s})
  w2.close()
  rows = [json.loads(l) for l in open(w2.jsonl)]
  train = [r["step"] for r in rows if r["split"] == "train"]
  assert train == [1, 2, 3, 4, 5, 6, 7]         # each step once
  assert [r["loss"] for r in rows if r["step"] >= 5] == [105.0, 106.0, 107.0]
  assert not any(r["split"] == "eval" for r in rows)
  # without resume_step the file is appended to as before; nothing to drop leaves it as is
  before = open(w2.jsonl).read()
  w3 = MetricsWriter(wd, 10, 7, progress=False, resume_step=7)
  assert w3.dropped_rows == 0 and open(w2.jsonl).read() == before
  w3.close()
  # TensorBoard, read back by its own reader: each step once, the resumed run's values after
  # the restored step (the dead run's steps 5-7 and its eval row at 6 purged)
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(os.path.join(wd, "tensorboard"))
  acc.Reload()
  loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
  assert loss == [(s, 10.0 - s) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 8)]
  assert "eval/loss" not in acc.Tags()["scalars"] or not [
      e for e in acc.Scalars("eval/loss") if e.step >= 5]
