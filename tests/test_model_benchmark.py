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


def test_model_benchmark_prefill_rate_table_follows_from_its_rows():
  """The prefill section's compute-rate table: FLOPs a token from the decoder layers' weights
  (hand count on the tiny teacher), GFLOP/s and the ceiling from each row's own numbers, and
  the bound on chunked / token by token that the machine's matmul rate sets."""
  from flax import nnx
  from linjax.models.llama import Llama, LlamaConfig
  bench = load_module("benchmarks/model_cpu.py", "model_cpu")
  h, kv = 64, 2 * 16                     # TINY: hidden 64, 2 KV heads of 16, MLP 128, 2 layers
  per_layer = h * h + 2 * h * kv + h * h + 3 * h * 128 + 2 * h   # q, k, v, o, MLP, 2 norms
  assert bench.layer_params(Llama(LlamaConfig(**bench.TINY), rngs=nnx.Rngs(0))) == 2 * per_layer
  lol, rec, teacher = bench.MODELS[2][0], bench.TOKEN_BY_TOKEN, bench.MODELS[0][0]
  prefill = {(lol, 1024): dict(tok_s=8000.0, flops_per_token=1e7),
             (lol, 4096): dict(tok_s=9000.0, flops_per_token=1e7),
             (teacher, 1024): dict(tok_s=6000.0, flops_per_token=9e6),
             (teacher, 4096): dict(tok_s=2000.0, flops_per_token=9e6),
             (rec, 1024): dict(tok_s=900.0, flops_per_token=1e7),
             (rec, 4096): dict(tok_s=1000.0, flops_per_token=1e7)}
  text = "\n".join(bench.prefill_roofline(prefill, 150.0))
  assert "float32 matmul rate, 150 GFLOP/s" in text
  assert "| model | GFLOP/s @ 4,096 |" in text            # the longest length every row ran
  assert f"| {lol} | 90.0 | 60% | 15,000 |" in text         # 9000 x 1e7 = 90 GFLOP/s
  assert f"| {teacher} | 18.0 | 12% | 16,667 |" in text
  assert f"| {rec} | 10.0 | 7% | 15,000 |" in text
  # 150 GFLOP/s / 1e7 FLOPs = 15,000 tok/s at most, 15x the 1,000 tok/s token-by-token rate
  assert "At 4,096 tokens" in text and "more than 15x faster than the token-by-token" in text
  assert "the chunked one is 9x." in text
  assert bench.prefill_roofline(prefill, None) == []
