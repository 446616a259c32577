"""Training-step throughput of SmolLM2-135M on CPU at seq 512: full fine-tune vs LoRA vs
feature-map-only (a LoLCATs-linearized model training only its `FeatureMapParam`s).

  python benchmarks/train_cpu.py                       # writes benchmarks/results/train_cpu.md
  python benchmarks/train_cpu.py --steps 5 --batch 1 --seq 512 --out /tmp/t.md

Each variant runs the trainer's own jit-compiled train step (`linjax.train.trainer.
make_train_step`: AdamW + clipping, cross-entropy on a packed row of the embedded held-out
pydoc text) on one CPU device; the first call (compilation) is timed separately and the
throughput is the median over `--steps` further steps.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

VARIANTS = {
    "full fine-tune": dict(trainable="all"),
    "LoRA r=8 on q,k,v,o": dict(trainable="lora"),
    "feature maps only (LoLCATs-linearized)": dict(trainable="feature_maps",
                                                   linearize={"mixer": "lolcats"}),
}


def _batch(seq, batch):
  from ml_collections import ConfigDict
  from linjax.train import data
  tok = data.load_tokenizer("smollm2")
  ids = data.tokenize(data.load_documents(ConfigDict(dict(path=None)), "eval"), tok)
  packed = data.pack(ids, seq)
  return packed.rows(np.arange(batch))


def bench_variant(name, over, args, batch_np):
  from linjax.parallel.mesh import make_mesh, use_mesh
  from linjax.parallel.rules import batch_sharding, param_shardings
  from linjax.train import optim as optim_lib
  from linjax.train.config import resolve
  from linjax.train.trainer import make_train_step, prepare_model

  cfg = resolve({"model": {"source": "smollm2"}, "data": {"seq_len": args.seq,
                 "batch_size": args.batch}, "steps": 1000, "mesh": {"data": 1},
                 "optim": {"lr": 1e-5}, **over})
  mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
  t0 = time.perf_counter()
  with use_mesh(mesh):
    model = prepare_model(cfg, mesh)
  load_s = time.perf_counter() - t0
  wrt = optim_lib.trainable_filter(cfg.trainable)
  n_train, n_total = optim_lib.count_params(model, wrt), optim_lib.count_params(model)
  tx, schedule = optim_lib.make_optimizer(cfg.optim, cfg.steps)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  state_sh = param_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  bsh = batch_sharding(mesh, 2, (args.batch, args.seq))
  batch_sh = {k: bsh for k in batch_np}
  step = make_train_step(graphdef, wrt, cfg, schedule, state_sh, batch_sh)
  batch = jax.device_put(batch_np, batch_sh)
  key = jax.random.key(0)
  with use_mesh(mesh):
    t0 = time.perf_counter()
    state, m = step(state, batch, key, jnp.int32(0))
    loss0 = float(m["loss"])
    compile_s = time.perf_counter() - t0
    times, cpu = [], []
    for i in range(args.steps):
      t0, c0 = time.perf_counter(), time.process_time()
      state, m = step(state, batch, key, jnp.int32(i + 1))
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
  med = statistics.median(times)
  tokens = args.batch * args.seq
  row = dict(name=name, trainable=n_train, total=n_total, load_s=load_s, compile_s=compile_s,
             step_s=med, min_s=min(times), tok_s=tokens / med, loss0=loss0,
             cpu_s=statistics.median(cpu), tok_cpu_s=tokens / statistics.median(cpu),
             loss_last=float(m["loss"]))
  print(f"{name}: {row['tok_s']:.0f} tok/s (median step {med:.2f} s, compile+first "
        f"{compile_s:.1f} s, trainable {n_train:,}/{n_total:,})", flush=True)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "train_cpu.md"))
  args = p.parse_args()
  batch = _batch(args.seq, args.batch)
  rows = []
  for name, over in VARIANTS.items():
    rows.append(bench_variant(name, over, args, batch))
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  lines = [
      "# Training-step throughput, SmolLM2-135M on CPU",
      "",
      f"`python benchmarks/train_cpu.py --steps {args.steps} --batch {args.batch} "
      f"--seq {args.seq}`",
      "",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
      f"{jax.devices()[0].platform} backend, float32. Batch {args.batch} x {args.seq} "
      f"tokens (embedded held-out pydoc text), AdamW + global-norm clipping, the trainer's "
      f"jit-compiled step. Median of {args.steps} steps after the compiling first one."
      + (f" Load average when finished: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
         f"on {os.cpu_count()} cores: other jobs shared the cores, so the wall-clock columns "
         f"are pessimistic and noisy; CPU-seconds per step (process time of all threads) are "
         f"the steadier comparison between variants." if load else ""),
      "",
      "| variant | trainable params | tokens/s (wall) | median step (s) | fastest step (s) | "
      "CPU-seconds / step | tokens / CPU-second | compile + first step (s) | loss first -> last |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in rows:
    lines.append(f"| {r['name']} | {r['trainable']:,} / {r['total']:,} | {r['tok_s']:.0f} | "
                 f"{r['step_s']:.2f} | {r['min_s']:.2f} | {r['cpu_s']:.1f} | {r['tok_cpu_s']:.1f} | "
                 f"{r['compile_s']:.1f} | "
                 f"{r['loss0']:.3f} -> {r['loss_last']:.3f} |")
  lines += ["", "LoRA and feature-map-only still run the full forward and the backward through "
            "every layer (activations' gradients), but skip the weight gradients and the "
            "optimizer update of the frozen weights. The linearized model computes both the "
            "sliding-window softmax and the linear-attention branch of LoLCATs' hybrid mixer.",
            ""]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
