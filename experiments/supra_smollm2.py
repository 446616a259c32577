"""SUPRA on SmolLM2-135M: phi = rotary(ReLU(W x + b)) (W = I at init), ALiBi-slope decays,
GroupNorm instead of the softmax denominator; full uptraining with cross-entropy.

    python -m linjax.linearize.run experiments/supra_smollm2.py:cpu
    python -m linjax.linearize.run experiments/supra_smollm2.py:gpu
"""
import ml_collections


def get_config(arg=None):
  arg = arg or "cpu"
  gpu = arg == "gpu"
  c = ml_collections.ConfigDict()
  c.name = f"supra_smollm2_{arg}"
  c.mixer = "supra"
  c.mixer_kwargs = {"decay": "alibi"}
  c.seq_len = 512
  c.seed = 0
  c.eval_windows = 6
  c.stage1 = ml_collections.ConfigDict(dict(steps=0, batch_size=1, lr=0.0, kind="mse",
                                            inner_steps=1, time_budget=0))
  c.stage2 = ml_collections.ConfigDict(dict(
      steps=600 if gpu else 100, batch_size=8 if gpu else 1, lr=1e-4, trainable="all",
      lora_rank=0, lora_alpha=0.0, lora_targets=(), warmup=50 if gpu else 10,
      time_budget=40 if gpu else 600))
  return c
