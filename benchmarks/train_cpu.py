"""Training-step cost of SmolLM2-135M on CPU, through the trainer itself: what each stage of a
linearization recipe costs a step, and what caching the teacher's top-k saves.

  python benchmarks/train_cpu.py                  # writes benchmarks/results/train_cpu.md
  python benchmarks/train_cpu.py --quick --out /tmp/t.md      # a tiny random Llama (a test)

Every row is one `linjax.train` run (`python -m linjax.train` with that config) of --steps + 1
steps of --batch x --seq tokens of the embedded training text; the first step (compilation)
is left out, and the time per step is the trainer's own count (`train_seconds / (steps - 1)`,
which includes fetching the batch, and with `kl_top_k` reading or computing the teacher's
top-k). Rows:

  full fine-tune (ce)                    every weight, next-token cross-entropy
  LoRA r 8 on q, k, v, o (ce)            adapters only
  LoLCATs stage 1                        the linjax recipe's attention transfer: feature maps,
                                         window factors and q / k / v LoRA, per-layer output
                                         MSE, teacher-forced (no backward through the model)
  LoLCATs stage 2, teacher on the fly    LoRA on the linearized student, KL to the teacher
                                         (the teacher's forward in every step)
  ... top-k cache, cold / warm           the same with `kl_top_k` (--top-k): the first run
                                         computes and writes each row's teacher top-k, a
                                         second run over the same rows only reads them
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

LORA4 = ("q_proj", "k_proj", "v_proj", "o_proj")


def configs(args, cache_dir):
  """[(row name, config)]: each a one-stage run of the trainer."""
  from linjax.train.config import base_config, stage, stages

  def run(name, st, linearized=False, **over):
    c = base_config()
    if args.quick:
      c.model.source, c.data.tokenizer, c.data.embedded_split = "tiny", "byte", "pydoc"
    else:
      c.model.source = "smollm2"
    c.progress = False
    c.ckpt.export = False
    c.ckpt.async_save = False
    if linearized:
      c.linearize = {"mixer": "lolcats", "window": min(64, args.seq // 8), "num_sinks": 4,
                     "init_linear_factor": 0.0}
    for k, v in over.items():
      c[k] = v
    st = stage(steps=args.steps + 1, seq_len=args.seq, batch_size=args.batch, log_every=1,
               ckpt_every=0, eval_every=0, eval_rows=1, **st)
    c.stages = stages(train=st)
    return name, c

  lora = lambda targets=LORA4: {"rank": 8, "alpha": 16.0, "targets": targets}
  kl = dict(trainable="lora", objective={"kl": 1.0, "ce": 0.0}, lora=lora(),
            optim={"lr": 1e-3})
  return [
      run("full fine-tune (ce)", dict(trainable="all", optim={"lr": 1e-5})),
      run("LoRA r 8 on q, k, v, o (ce)", dict(trainable="lora", lora=lora(),
                                              optim={"lr": 1e-4})),
      run("LoLCATs stage 1: feature maps + q, k, v LoRA, attention transfer",
          dict(trainable="feature_maps+lora", objective={"attention_mse": 1.0},
               transfer_scale=1000.0, lora=lora(LORA4[:3]), optim={"lr": 3e-3}),
          linearized=True),
      run("LoLCATs stage 2: LoRA, KL, teacher on the fly", kl, linearized=True),
      run(f"LoLCATs stage 2: LoRA, KL top-{args.top_k}, cache cold",
          dict(kl, kl_top_k=args.top_k), linearized=True, teacher_cache=cache_dir),
      run(f"LoLCATs stage 2: LoRA, KL top-{args.top_k}, cache warm",
          dict(kl, kl_top_k=args.top_k), linearized=True, teacher_cache=cache_dir),
  ]


def bench(name, cfg, workdir):
  from linjax.train.trainer import train
  t0 = time.perf_counter()
  s = train(cfg, workdir)
  st = s["stages"][0]
  n = st["steps"] - 1
  row = dict(name=name, step_s=st["train_seconds"] / n, steps=n, wall_s=time.perf_counter() - t0,
             trainable=st["trainable_params"], total=s["total_params"],
             tok_s=cfg.stages.train.batch_size * cfg.stages.train.seq_len * n / st["train_seconds"],
             first=st["first_loss"], last=st["final_loss"], cache=st.get("teacher_cache"))
  print(f"{name}: {row['step_s']:.2f} s / step, {row['tok_s']:.0f} tokens/s", flush=True)
  return row


def table(rows, args) -> list[str]:
  try:
    load = "load average when finished %.1f / %.1f / %.1f" % os.getloadavg()
  except OSError:
    load = "load average unknown"
  cmd = "python benchmarks/train_cpu.py" + (" --quick" if args.quick else "") + (
      f" --steps {args.steps} --batch {args.batch} --seq {args.seq} --top-k {args.top_k}")
  model = "a tiny random Llama" if args.quick else "SmolLM2-135M-Instruct (the GGUF)"
  lines = [
      "# Training-step cost on CPU, stage by stage", "", f"`{cmd}`", "",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
      f"{jax.devices()[0].platform} backend, float32, {load}. Model: {model}. Each row is "
      f"one trainer run of {args.steps} timed steps (after the compiling first one) of "
      f"{args.batch} x {args.seq} tokens; a step's time is the trainer's own count (batch "
      "fetch, teacher top-k lookup or computation, and the jitted step).", "",
      "| stage | trainable params | s / step | tokens / s | x on-the-fly KL step | loss first -> last | teacher rows computed / read |",
      "|---|---:|---:|---:|---:|---|---|",
  ]
  ref = next(r["step_s"] for r in rows if "on the fly" in r["name"])
  for r in rows:
    c = r["cache"]
    cache = "-" if c is None else f"{c['misses']} / {c['hits']}"
    lines.append(f"| {r['name']} | {r['trainable']:,} / {r['total']:,} | {r['step_s']:.2f} | "
                 f"{r['tok_s']:.0f} | {r['step_s'] / ref:.2f} | {r['first']:.3f} -> "
                 f"{r['last']:.3f} | {cache} |")
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="a tiny random Llama, 64-token rows")
  p.add_argument("--steps", type=int, default=4, help="timed steps per row (+1 compiling)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--top-k", type=int, default=64, help="kl_top_k of the cached rows")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "train_cpu.md"))
  args = p.parse_args(argv)
  if args.quick:
    args.seq = min(args.seq, 64)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, cfg) in enumerate(configs(args, os.path.join(tmp, "cache"))):
      rows.append(bench(name, cfg, os.path.join(tmp, f"run{i}")))
  lines = table(rows, args)
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  return rows


if __name__ == "__main__":
  main()
