"""The `linjax` command: convert (to linjax / HF) and generate, streamed to stdout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.test_llama_common import hf_model, make_word_tokenizer, saved_hf_dir, transformers
from linjax.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli") / "hf"
  shutil.copytree(saved_hf_dir("gqa_llama3_bias"), d)
  make_word_tokenizer(d)
  return d


def test_convert_and_generate(hf_dir, tmp_path, capsys):
  lj = tmp_path / "lj"
  assert main(["convert", str(hf_dir), str(lj)]) == 0
  err = capsys.readouterr().err   # progress on stderr: the load, its size, the write
  assert f"loading {hf_dir} ..." in err and "M parameters (2 layers) in" in err, err
  assert "writing the linjax checkpoint" in err and f"wrote linjax checkpoint to {lj}" in err
  assert os.path.isdir(lj / "state") and os.path.exists(lj / "tokenizer.json")
  hf = tmp_path / "back_hf"
  assert main(["convert", str(lj), str(hf), "--to", "hf"]) == 0
  back = transformers.LlamaForCausalLM.from_pretrained(hf)
  import torch
  sd, ref = back.state_dict(), hf_model("gqa_llama3_bias").state_dict()
  assert all(torch.equal(sd[k], ref[k]) for k in ref)
  capsys.readouterr()
  assert main(["generate", "--model", str(lj), "--prompt", "w5 w6 w7", "--max-new-tokens", "6"]) == 0
  out = capsys.readouterr().out.strip().split()
  assert len(out) >= 1 and all(w.startswith("w") for w in out)
  # the same through transformers' greedy decode
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  ids = tok("w5 w6 w7", return_tensors="pt")["input_ids"]
  gen = hf_model("gqa_llama3_bias").generate(ids, max_new_tokens=6, do_sample=False,
                                             eos_token_id=tok.eos_token_id, pad_token_id=0)
  want = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split()
  assert out == want
  # several prompts run as one batch; each row equals its own single-prompt run
  prompts = ["w5 w6 w7", "w9", "w3 w4 w5 w6 w8"]
  singles = []
  for p in prompts:
    main(["generate", "--model", str(lj), "--prompt", p, "--max-new-tokens", "5"])
    singles.append(capsys.readouterr().out.strip())
  argv = ["generate", "--model", str(lj), "--max-new-tokens", "5"]
  for p in prompts:
    argv += ["--prompt", p]
  assert main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0::2] == ["--- [0]", "--- [1]", "--- [2]"]
  assert [l.strip() for l in lines[1::2]] == singles


def test_cli_errors_and_module_entry(tmp_path):
  with pytest.raises(SystemExit):
    main(["generate"])  # --model and --prompt are required
  # bad input: one line on stderr, exit status 2 (no traceback)
  assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o")]) == 2
  r = subprocess.run([sys.executable, "-m", "linjax", "--help"], capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0 and "convert" in r.stdout and "generate" in r.stdout
  assert "linearize" in r.stdout and "--config" in r.stdout
  import linjax
  r = subprocess.run([sys.executable, "-m", "linjax", "--version"], capture_output=True,
                     text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0 and r.stdout.strip() == f"linjax {linjax.__version__}"


@pytest.mark.parametrize("sub,expect", [
    ("convert", ["src", "dst", "--to"]),
    ("generate", ["--model", "--prompt", "--method"]),
    ("train", ["--config FILE.py[:ARG]", "--workdir", "--config.FIELD=VALUE", "time_budget_s",
               "experiments/lolcats_smollm2.py"]),
    ("linearize", ["--config FILE.py[:ARG]", "--workdir", "keep_softmax.*"]),
    ("eval", ["--model", "--teacher", "--baseline", "--suite"]),
])
def test_every_subcommand_has_a_useful_help(sub, expect, capsys):
  """`linjax SUB --help` exits 0 and names the flags a user needs (train / linearize used
  to print absl's one-line "Try --helpfull")."""
  try:
    rc = main([sub, "--help"])
  except SystemExit as e:    # argparse's --help
    rc = e.code
  out = capsys.readouterr().out
  assert rc == 0, out
  assert out.startswith(f"usage: linjax {sub}"), out[:200]
  for e in expect:
    assert e in out, (sub, e, out)
