"""LoLCATs on SmolLM2-135M-Instruct: Hedgehog linear attention + a 64-token softmax window.

    python -m linjax.train --config experiments/lolcats_smollm2.py:paper_15m --workdir runs/lolcats_paper_15m
    python -m linjax.train --config experiments/lolcats_smollm2.py:linjax_15m --workdir runs/lolcats_linjax_15m
    python -m linjax.train --config experiments/lolcats_smollm2.py:demo --workdir workdir/demo   # = make demo

Arg = <recipe>_<budget> (or "demo" = linjax_15m with the demo's end-of-run evaluation, or
"smoke": a 2-layer cut for tests):
  recipe "paper": the LoLCATs paper's settings. Stage 1 attention transfer: only the feature
    maps and window factors train, per-layer MSE of the head outputs (x 1000), Adam lr 1e-2,
    teacher-forced. Stage 2: LoRA r=8 (alpha 16) on q, k, v, o with next-token cross-entropy,
    lr 1e-4, 8 x 1024-token effective batches (gradient accumulation), reduce-on-plateau,
    the best validation step kept. No sinks; the linear part at full weight from step 0.
  recipe "linjax": the same hybrid with linjax's options, each measured in
    experiments/results/linearization.md: 4 attention sinks in the window; the hybrid
    initialised to equal sliding window 64 + 4 sinks at step 0 (a learned per-head linear
    factor starting at 0); the KEEP_SOFTMAX layers whose restoring alone wins back the most
    output KL to the teacher at initialisation (`keep_softmax.criterion = "kl"`, on 2,048
    training tokens) stay softmax attention (their KV cache grows; the others' is constant);
    stage 1 also fits LoRA r 8 adapters on q / k / v to the per-layer outputs (teacher-forced:
    each layer's loss reaches only its own adapters, no backward through the model; merged
    before stage 2), at lr 3e-3 for adapters and feature maps alike; stage 2 distils the
    teacher's next-token distribution (KL) instead of fitting the corpus (CE), on short
    batches with a higher rate, as a CPU budget wants.
  budget "15m" / "60m": the stage time budgets of a 15- / 60-minute run on 2 CPU cores (load,
    compilation and the end evaluation come on top); "gpu": one GPU, minutes.

Sweeps over the same rows (recipes, learning rates, seeds of the student) can compute the
teacher's stage-2 output once: `--config.stages.finetune.kl_top_k=64
--config.teacher_cache=DIR` distils its cached top-64 tokens + one rest bucket (linjax recipe;
`linjax.train.teacher_cache`), and the train step then runs no teacher.
"""
from ml_collections import ConfigDict

from linjax.train.config import RECIPE_BUDGETS, base_config, recipe_arg, stage, stages

# linjax recipe: layers kept as softmax attention (the ones whose restoring wins back the most
# output KL at initialisation, `linjax.linearize.select`). Measured in
# experiments/results/linearization.md: 8 of the 30 (their KV cache grows: ~27% of the
# teacher's decode memory) give the 15-minute run top-1 0.902 / KL 0.043, 6 give 0.889-0.892 /
# 0.054
KEEP_SOFTMAX = 8
BUDGETS = dict(RECIPE_BUDGETS, smoke=(0, 0))


def get_config(arg: str = "linjax_15m"):
  recipe, budget, t1, t2 = recipe_arg(arg, BUDGETS,
                                      {"demo": "linjax_15m", "smoke": "linjax_smoke"})
  gpu = budget == "gpu"
  c = base_config()
  c.model.source = "smollm2"
  c.model.scan_layers = True
  c.linearize = ConfigDict({"mixer": "lolcats", "window": 64, "variant": "sw"})
  if recipe == "linjax":
    c.linearize.num_sinks = 4
    c.linearize.init_linear_factor = 0.0
    c.keep_softmax.layers = KEEP_SOFTMAX
  transfer = stage(
      steps=100000, time_budget_s=t1, trainable="feature_maps",
      objective={"attention_mse": 1.0}, transfer_scale=1000.0, seq_len=1024 if gpu else 512,
      batch_size=8 if gpu else 1, optim={"lr": 1e-2, "schedule": "constant", "b2": 0.999,
                                         "weight_decay": 0.0}, log_every=5, ckpt_every=50)
  if recipe == "linjax":   # q / k / v adapters fitted on the per-layer outputs too
    transfer.trainable = "feature_maps+lora"
    transfer.lora.targets = ("q_proj", "k_proj", "v_proj")
    transfer.optim.lr = 3e-3
  if recipe == "paper":
    finetune = stage(
        steps=100000, time_budget_s=t2, trainable="lora", objective={"ce": 1.0, "kl": 0.0},
        seq_len=1024, batch_size=8, grad_accum=1 if gpu else 8,
        lora={"rank": 8, "alpha": 16.0, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")},
        optim={"lr": 1e-4, "schedule": "plateau", "b2": 0.999, "weight_decay": 0.0,
               "plateau": {"patience": 10, "factor": 0.1}},
        eval_every=10, eval_rows=8, keep_best=True, log_every=1, ckpt_every=10)
  else:
    finetune = stage(
        steps=100000, time_budget_s=t2, trainable="lora", objective={"kl": 1.0, "ce": 0.0},
        seq_len=512, batch_size=8 if gpu else 1,
        lora={"rank": 8, "alpha": 16.0, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")},
        optim={"lr": 1e-3, "schedule": "cosine", "warmup_steps": 10, "b2": 0.999,
               "weight_decay": 0.0},
        eval_every=25, eval_rows=4, keep_best=True, log_every=5, ckpt_every=25)
  c.stages = stages(transfer=transfer, finetune=finetune)
  if arg == "demo":
    c.eval.suite = "demo"
    c.eval.baselines = ("sliding_window:64:4", "sliding_window:128:4", "sliding_window:64:4:kept")
    c.eval.prompts = ("The Python interpreter", "A list comprehension is", "To open a file,")
  if budget == "smoke":   # tests: a tiny random Llama, a few steps
    c.model.source = "tiny"
    c.model.scan_layers = False
    c.data.embedded_split = "pydoc"
    c.data.max_rows = 32
    for s in c.stages.values():
      s.steps, s.time_budget_s, s.seq_len, s.batch_size, s.grad_accum = 3, 0.0, 64, 2, 1
      s.eval_rows, s.eval_every, s.ckpt_every = 2, 0, 0
    c.linearize.window = 8
    c.keep_softmax.layers = 0
  return c
