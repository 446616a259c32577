"""Train a tiny random Llama from scratch on the embedded corpus (byte tokenizer).

The quickest end-to-end check of the training stack: no download, no pretrained weights.

  python -m linjax.train --config experiments/tiny_llama.py:cpu --workdir /tmp/tiny_llama
  python -m linjax.train --config experiments/tiny_llama.py:smoke --workdir /tmp/tiny_smoke
  python -m linjax.train --config experiments/tiny_llama.py:lora --workdir /tmp/tiny_lora
  python -m linjax.train --config experiments/tiny_llama.py:gpu --workdir /tmp/tiny_gpu

Args: "cpu" (2-layer d=64 model, 300 steps of 8 x 128 bytes, a few minutes on 2 cores),
"smoke" (2 steps), "lora" (the cpu run training only LoRA adapters on attention),
"gpu" (4-layer d=256 model, 2000 steps of 32 x 512 bytes, bf16 compute).
Any field can be overridden, e.g. `--config.stages.train.optim.lr=1e-3 --config.mesh.data=2`.
"""
from linjax.train.config import base_config, stage, stages, tiny_llama_dict

ARGS = ("cpu", "smoke", "lora", "gpu")


def get_config(arg: str = "cpu"):
  if arg not in ARGS:
    raise ValueError(f"unknown arg {arg!r}; one of {ARGS}")
  config = base_config()
  config.model.source = "tiny"
  config.data.tokenizer = "byte"
  st = stage(steps=300, seq_len=128, batch_size=8, log_every=10, eval_every=100,
             ckpt_every=100, optim={"lr": 3e-3, "warmup_steps": 20})
  if arg == "smoke":
    st.steps, st.eval_every, st.eval_rows = 2, 0, 2
    config.data.max_rows = 64
  if arg == "lora":
    st.trainable = "lora"
    st.lora.rank, st.lora.alpha = 4, 8.0
  if arg == "gpu":
    tiny = tiny_llama_dict()
    tiny.update(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4)
    config.model.tiny = tiny
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    st.seq_len, st.batch_size, st.steps = 512, 32, 2000
    st.eval_every = st.ckpt_every = 500
    st.optim.lr, st.optim.warmup_steps = 1e-3, 100
  config.stages = stages(train=st)
  return config
