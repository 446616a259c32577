"""benchmarks/train_cpu.py at its --quick size: every stage row comes from a real trainer run,
and the top-k cache rows say what they did (the cold run computes every row's teacher top-k,
the warm run over the same rows computes none)."""
from tests.helpers import load_module


def test_train_benchmark_quick(tmp_path):
  bench = load_module("benchmarks/train_cpu.py", "train_cpu")
  out = tmp_path / "t.md"
  rows = bench.main(["--quick", "--steps", "2", "--batch", "2", "--top-k", "8", "--out", str(out)])
  by = {r["name"]: r for r in rows}
  cold, warm = (by[f"LoLCATs stage 2: LoRA, KL top-8, cache {w}"] for w in ("cold", "warm"))
  # 3 steps x 2 rows, and the end-of-stage validation batch (2 rows)
  assert cold["cache"]["misses"] == 3 * 2 + 2 and cold["cache"]["hits"] == 0
  assert warm["cache"]["misses"] == 0 and warm["cache"]["hits"] == 3 * 2 + 2
  assert warm["first"] == cold["first"]                                   # the same rows
  fly = by["LoLCATs stage 2: LoRA, KL, teacher on the fly"]
  assert fly["cache"] is None and fly["first"] >= cold["first"] - 1e-6    # KL_k <= KL
  text = out.read_text()
  for r in rows:
    assert f"| {r['name']} |" in text and r["step_s"] > 0
  assert "| 8 / 0 |" in text and "| 0 / 8 |" in text
  assert fly["first"] > 0                             # the window-8 student differs
