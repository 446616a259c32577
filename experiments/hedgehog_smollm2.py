"""Hedgehog on SmolLM2-135M-Instruct: pure linear attention with Hedgehog feature maps (no
window), trained by attention-weight cross-entropy (teacher-forced, feature maps only), then
fine-tuned with LoRA.

    python -m linjax.train --config experiments/hedgehog_smollm2.py:paper_15m --workdir runs/hedgehog_paper_15m
    python -m linjax.train --config experiments/hedgehog_smollm2.py:linjax_15m --workdir runs/hedgehog_linjax_15m

  recipe "paper": Hedgehog's two steps: attention distillation of the feature maps by the
    cross-entropy between softmax and linear attention weights (Adam lr 1e-2), then LoRA r=8
    (alpha 16) on q, k, v, o with next-token cross-entropy (lr 1e-4).
  recipe "linjax": attention transfer by the head-output MSE (cheaper: no T x T student
    weights) and the second stage distilling the teacher's next-token distribution (KL).
  budget "15m" / "60m" / "gpu": as experiments/lolcats_smollm2.py.
"""
from ml_collections import ConfigDict

from linjax.train.config import base_config, recipe_arg, stage, stages

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def get_config(arg: str = "linjax_15m"):
  recipe, budget, t1, t2 = recipe_arg(arg)
  bs = 8 if budget == "gpu" else 1
  c = base_config()
  c.model.source = "smollm2"
  c.model.scan_layers = True
  c.linearize = ConfigDict({"mixer": "linear", "feature_map": "hedgehog"})
  paper = recipe == "paper"
  c.stages = stages(
      transfer=stage(steps=100000, time_budget_s=t1, trainable="feature_maps",
                     objective={"attention_xent": 1.0} if paper else {"attention_mse": 1.0},
                     transfer_scale=1.0 if paper else 1000.0, seq_len=512, batch_size=bs,
                     optim={"lr": 1e-2, "schedule": "constant", "weight_decay": 0.0},
                     log_every=5, ckpt_every=50),
      finetune=stage(steps=100000, time_budget_s=t2, trainable="lora",
                     objective={"ce": 1.0, "kl": 0.0} if paper else {"kl": 1.0, "ce": 0.0},
                     seq_len=512, batch_size=bs, lora={"rank": 8, "alpha": 16.0, "targets": QKVO},
                     optim={"lr": 1e-4 if paper else 1e-3, "schedule": "cosine",
                            "weight_decay": 0.0},
                     eval_every=25, eval_rows=4, keep_best=not paper, log_every=5,
                     ckpt_every=25))
  return c
