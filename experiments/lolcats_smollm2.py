"""LoLCATs on SmolLM2-135M: Hedgehog + 64-token sliding-window hybrid, then LoRA.

Stage 1: attention transfer (per-layer MSE of the head outputs before o_proj, teacher-forced,
only feature maps and window factors train, lr 1e-2). Stage 2: LoRA r=8, alpha=16 on
q, k, v, o with next-token cross-entropy (init from stage 1: same model object).

    python -m linjax.linearize.run experiments/lolcats_smollm2.py:cpu      # ~15 min, 2 cores
    python -m linjax.linearize.run experiments/lolcats_smollm2.py:gpu      # one H100
    python -m linjax.linearize.run experiments/lolcats_smollm2.py:tk_gpu   # block-terrace variant
"""
import ml_collections


def get_config(arg=None):
  arg = arg or "cpu"
  c = ml_collections.ConfigDict()
  variant = "tk" if arg.startswith("tk") else "sw"
  c.name = f"lolcats_{variant}_smollm2_{arg.split('_')[-1]}"
  c.mixer = "lolcats"
  c.mixer_kwargs = {"window": 64, "variant": variant}
  c.seq_len = 512
  c.seed = 0
  c.eval_windows = 6
  gpu = arg.endswith("gpu")
  c.stage1 = dict(steps=300 if gpu else 200, batch_size=8 if gpu else 1, lr=1e-2, kind="mse",
                  inner_steps=2, time_budget=35 if gpu else 360)
  c.stage2 = dict(steps=600 if gpu else 100, batch_size=8 if gpu else 1, lr=1e-3,
                  trainable="lora", lora_rank=8, lora_alpha=16.0,
                  lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), warmup=0,
                  time_budget=60 if gpu else 300)
  c.stage1 = ml_collections.ConfigDict(c.stage1)
  c.stage2 = ml_collections.ConfigDict(c.stage2)
  return c
