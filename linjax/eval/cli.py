"""`linjax eval`: the evaluation suite on one or more models, as one table and one plot.

  linjax eval --model runs/lolcats/ckpt --teacher SmolLM2.gguf --suite quick --out eval_out

prints a markdown table (one row per model, the teacher included: perplexity on held-out
embedded text, top-1 agreement with the teacher, MQAR and passkey accuracy by context
length) and writes `results.json`, `results.md` and `recall.png` (recall vs context length
for every model) into --out.
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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="linjax eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", required=True,
                 help="a model linjax.from_pretrained reads (repeat for several)")
  p.add_argument("--teacher", default=None,
                 help="reference model (same tokenizer): adds top-1 agreement and a row")
  p.add_argument("--suite", default="quick", help="quick (default) or tiny")
  p.add_argument("--out", default="eval_out", help="folder for results.json/.md, recall.png")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = p.parse_args(argv)

  import linjax
  from linjax.eval.suite import SUITES, evaluate, plot_recall, results_table
  if args.suite not in SUITES:
    p.error(f"unknown suite {args.suite!r}; available: {sorted(SUITES)}")
  os.makedirs(args.out, exist_ok=True)

  results: dict[str, dict] = {}
  teacher = None
  if args.teacher:
    name = _name(args.teacher, results) + " (teacher)"
    print(f"[eval] {name}: {args.teacher}", flush=True)
    teacher, tok = linjax.from_pretrained(args.teacher, dtype=args.dtype)
    results[name] = evaluate(teacher, tokenizer=tok, suite=args.suite, verbose=True)
  for path in args.model:
    name = _name(path, results)
    print(f"[eval] {name}: {path}", flush=True)
    model, tok = linjax.from_pretrained(path, dtype=args.dtype)
    results[name] = evaluate(model, tokenizer=tok, teacher=teacher, suite=args.suite,
                             verbose=True)
    del model

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
