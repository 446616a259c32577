"""Train a tiny random Llama from scratch on the embedded corpus (byte tokenizer).

The quickest end-to-end check of the training stack: no download, no pretrained weights.

  python -m linjax.train --config experiments/tiny_llama.py:cpu --workdir /tmp/tiny_llama
  python -m linjax.train --config experiments/tiny_llama.py:smoke --workdir /tmp/tiny_smoke
  python -m linjax.train --config experiments/tiny_llama.py:lora --workdir /tmp/tiny_lora
  python -m linjax.train --config experiments/tiny_llama.py:gpu --workdir /tmp/tiny_gpu

Args: "cpu" (2-layer d=64 model, 300 steps of 8 x 128 bytes, a few minutes on 2 cores),
"smoke" (2 steps), "lora" (the cpu run training only LoRA adapters on attention),
"gpu" (4-layer d=256 model, 2000 steps of 32 x 512 bytes, bf16 compute).
Any field can be overridden, e.g. `--config.optim.lr=1e-3 --config.mesh.data=2`.
"""
from linjax.train.config import base_config, tiny_llama_dict

ARGS = ("cpu", "smoke", "lora", "gpu")


def get_config(arg: str = "cpu"):
  if arg not in ARGS:
    raise ValueError(f"unknown arg {arg!r}; one of {ARGS}")
  config = base_config()
  config.model.source = "tiny"
  config.data.tokenizer = "byte"
  config.data.seq_len = 128
  config.data.batch_size = 8
  config.steps = 300
  config.log_every = 10
  config.eval_every = 100
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 20
  config.ckpt.every = 100
  if arg == "smoke":
    config.steps = 2
    config.eval_every = 0
    config.data.max_rows = 64
    config.data.eval_rows = 2
  if arg == "lora":
    config.trainable = "lora"
    config.lora.rank = 4
    config.lora.alpha = 8.0
  if arg == "gpu":
    tiny = tiny_llama_dict()
    tiny.update(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4)
    config.model.tiny = tiny
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.data.seq_len = 512
    config.data.batch_size = 32
    config.steps = 2000
    config.eval_every = 500
    config.ckpt.every = 500
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 100
  return config
