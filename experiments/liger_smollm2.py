"""Liger on SmolLM2-135M: gates pooled from k, softmax feature maps, GLA + 64-token window
softmax mixed 0.5 / 0.5; no new parameters. LoRA r=8, alpha=16 on q, k, v with cross-entropy.

    python -m linjax.linearize.run experiments/liger_smollm2.py:cpu
    python -m linjax.linearize.run experiments/liger_smollm2.py:gpu
"""
import ml_collections


def get_config(arg=None):
  arg = arg or "cpu"
  gpu = arg == "gpu"
  c = ml_collections.ConfigDict()
  c.name = f"liger_smollm2_{arg}"
  c.mixer = "liger"
  c.mixer_kwargs = {"window": 64}
  c.seq_len = 512
  c.seed = 0
  c.eval_windows = 6
  c.stage1 = ml_collections.ConfigDict(dict(steps=0, batch_size=1, lr=0.0, kind="mse",
                                            inner_steps=1, time_budget=0))
  c.stage2 = ml_collections.ConfigDict(dict(
      steps=600 if gpu else 100, batch_size=8 if gpu else 1, lr=1e-3, trainable="lora",
      lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj", "k_proj", "v_proj"), warmup=0,
      time_budget=50 if gpu else 600))
  return c
