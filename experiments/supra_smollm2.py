"""SUPRA on SmolLM2-135M-Instruct: phi = rotary(ReLU(W x + b)) (W = I at init), ALiBi-slope
decays, GroupNorm instead of the softmax denominator.

    python -m linjax.train --config experiments/supra_smollm2.py:paper_15m --workdir runs/supra_paper_15m
    python -m linjax.train --config experiments/supra_smollm2.py:linjax_15m --workdir runs/supra_linjax_15m

  recipe "paper": SUPRA's uptraining: every weight trains with next-token cross-entropy,
    AdamW lr 1e-4 with 1% warmup and cosine decay, weight decay 0.1, z-loss 1e-4 (the OpenLM
    defaults SUPRA trains with); no attention-transfer stage.
  recipe "linjax": the GroupNorm gets a per-head affine initialised from the teacher's
    attention-output statistics (`config.calibrate`), then a stage of attention transfer (the
    feature maps and the affine, teacher-forced per-layer MSE) before distilling the teacher's
    next-token distribution (KL) with every weight training.
  budget "15m" / "60m" / "gpu": as experiments/lolcats_smollm2.py.
"""
from ml_collections import ConfigDict

from linjax.train.config import base_config, recipe_arg, stage, stages


def get_config(arg: str = "linjax_15m"):
  recipe, budget, t1, t2 = recipe_arg(arg)
  bs = 8 if budget == "gpu" else 1
  c = base_config()
  c.model.source = "smollm2"
  c.model.scan_layers = True
  c.linearize = ConfigDict({"mixer": "supra", "decay": "alibi"})
  full = dict(trainable="all", seq_len=512, batch_size=bs, eval_every=25, eval_rows=4,
              log_every=5, ckpt_every=25)
  if recipe == "paper":
    c.stages = stages(uptrain=stage(
        steps=100000, time_budget_s=t1 + t2, objective={"ce": 1.0, "z_loss": 1e-4},
        optim={"lr": 1e-4, "schedule": "cosine", "warmup_steps": 10, "weight_decay": 0.1}, **full))
    return c
  c.linearize.norm_affine = True
  c.calibrate.tokens = 2048
  c.stages = stages(
      transfer=stage(steps=100000, time_budget_s=t1, trainable="feature_maps",
                     objective={"attention_mse": 1.0}, transfer_scale=1000.0, seq_len=512,
                     batch_size=bs, optim={"lr": 1e-3, "schedule": "constant",
                                           "weight_decay": 0.0}, log_every=5, ckpt_every=50),
      finetune=stage(steps=100000, time_budget_s=t2, objective={"kl": 1.0, "ce": 0.0},
                     optim={"lr": 1e-4, "schedule": "cosine", "warmup_steps": 10,
                            "weight_decay": 0.0}, keep_best=True, **full))
  return c
