"""`linjax eval`: an evaluation suite on one or more models against a teacher, one table.

  linjax eval --model workdir/lolcats --teacher smollm2 --suite quick --out eval_out \
      --baseline sliding_window:64:4

scores every model (a trainer workdir, a linjax / HF folder, a .gguf; "smollm2" is the
embedded default) and the teacher on the held-out split in one pass per batch (the teacher
runs once): perplexity and its ratio to the teacher's, top-1 agreement and KL(teacher ||
model) with 95% intervals, MQAR and passkey accuracy by context length. Prints the markdown
table and writes `results.json`, `results.md` and `recall.png` into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _name(path: str, taken: dict) -> str:
  base = os.path.basename(os.path.normpath(path)) or path
  for ext in (".gguf", ".safetensors"):
    base = base[:-len(ext)] if base.endswith(ext) else base
  name, i = base, 2
  while name in taken:
    name, i = f"{base}-{i}", i + 1
  return name


def parser():
  p = argparse.ArgumentParser(prog="linjax eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", default=[],
                 help="a model or trainer workdir (repeat for several)")
  p.add_argument("--teacher", default=None,
                 help="reference model (same tokenizer): ratio, top-1, KL and its own row")
  p.add_argument("--baseline", action="append", default=[],
                 help="no-training baseline from the teacher, e.g. sliding_window:64:4")
  p.add_argument("--suite", default="quick", help="quick (default), demo or tiny")
  p.add_argument("--out", default="eval_out", help="folder for results.json/.md, recall.png")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  import linjax
  from linjax.eval.suite import (SUITES, baseline_models, evaluate_models, plot_recall,
                                 results_table)
  if args.suite not in SUITES:
    raise ValueError(f"unknown suite {args.suite!r}; available: {sorted(SUITES)}")
  if not args.model and not args.teacher:
    raise ValueError("nothing to evaluate: give --model (and --teacher)")
  if args.baseline and not args.teacher:
    raise ValueError("--baseline needs --teacher (baselines are built from it)")
  os.makedirs(args.out, exist_ok=True)
  teacher, tok = None, None
  if args.teacher:
    print(f"[eval] loading the teacher {args.teacher}", flush=True)
    teacher, tok = linjax.from_pretrained(args.teacher, dtype=args.dtype)
  models = {}
  for path in args.model:
    print(f"[eval] loading {path}", flush=True)
    m, t = linjax.from_pretrained(path, dtype=args.dtype)
    tok = tok or t
    models[_name(path, models)] = m
  if teacher is not None:
    # a ":kept" baseline keeps the softmax layers of the first --model
    first = next(iter(models.values()), None)
    models |= baseline_models(teacher, args.baseline, first)
  if tok is None:
    raise ValueError("no tokenizer found with the models")
  results = evaluate_models(models, tokenizer=tok, teacher=teacher, suite=args.suite,
                            progress=True)
  table = results_table(results)
  print(table)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  png = plot_recall(results, os.path.join(args.out, "recall.png"))
  print(f"wrote {png}, results.json, results.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
