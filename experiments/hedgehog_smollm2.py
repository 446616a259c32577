"""Hedgehog on SmolLM2-135M: pure linear attention with Hedgehog feature maps (no window),
trained by attention-weight cross-entropy distillation (teacher-forced, feature maps only),
then LoRA r=8, alpha=16 on q, k, v, o with cross-entropy.

    python -m linjax.linearize.run experiments/hedgehog_smollm2.py:cpu
    python -m linjax.linearize.run experiments/hedgehog_smollm2.py:gpu
"""
import ml_collections


def get_config(arg=None):
  arg = arg or "cpu"
  gpu = arg == "gpu"
  c = ml_collections.ConfigDict()
  c.name = f"hedgehog_smollm2_{arg}"
  c.mixer = "linear"
  c.mixer_kwargs = {"feature_map": "hedgehog"}
  c.seq_len = 512
  c.seed = 0
  c.eval_windows = 6
  c.stage1 = ml_collections.ConfigDict(dict(
      steps=300 if gpu else 150, batch_size=8 if gpu else 1, lr=1e-2, kind="xent",
      inner_steps=2, time_budget=20 if gpu else 360))
  c.stage2 = ml_collections.ConfigDict(dict(
      steps=600 if gpu else 100, batch_size=8 if gpu else 1, lr=1e-3, trainable="lora",
      lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
      warmup=0, time_budget=30 if gpu else 300))
  return c
