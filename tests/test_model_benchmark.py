"""benchmarks/model_cpu.py at its --quick size: the whole-model table cannot rot, and its
device options (several mixer methods side by side, MFU, the chunked loss beside the
whole-logits teacher) produce the rows they name."""
import re

from tests.helpers import load_module


def test_model_benchmark_quick_runs_every_method_side_by_side(tmp_path):
  bench = load_module("benchmarks/model_cpu.py", "model_cpu")
  md = tmp_path / "model.md"
  train, _, _, _ = bench.main(["--quick", "--sections", "train", "--methods", "chunk,parallel",
                               "--peak-tflops", "1", "--loss-chunk", "8", "--md", str(md)])
  names = {n for n, _ in train}
  for m in ("LoLCATs sw (window 64)", "Liger (window 64)", "GLA"):
    assert {f"{m} [chunk]", f"{m} [parallel]"} <= names
  assert bench.WHOLE in names and bench.MASKED in names
  text = md.read_text()
  assert "loss over 8 positions at a time" in text and "| MFU |" in text
  # every timed row has a tokens/s and an MFU that follow from its own step time
  for n, T in train:
    r = train[(n, T)]
    if r["wall_s"] is not None:
      row = next(l for l in text.splitlines() if l.startswith(f"| {n} | {T} |"))
      cells = [c.strip() for c in row.strip("|").split("|")]
      assert int(cells[5].replace(",", "")) == round(r["B"] * T / r["wall_s"])
      assert re.fullmatch(r"\d+\.\d%", cells[8])
