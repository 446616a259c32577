"""Summarise the recipe runs in a results folder: one markdown table and one PNG.

    python -m linjax.linearize.summary experiments/results

Reads every `<name>.json` written by `python -m linjax.linearize.run` (files with a
`ppl_ratio`), prints the table (recipe, tokens, student perplexity, ratio to the teacher,
top-1 agreement, wall time, machine) and saves `linearization.png`: perplexity ratio and
top-1 agreement per run against the number of training tokens, the 1.10 target drawn in.
An optional `eval_quick_baselines.json` adds the no-training sliding-window baseline line.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

TARGET_RATIO = 1.10
HEADER = ("| run | tokens | student ppl | ratio | top-1 | wall | machine |\n"
          "|---|---|---|---|---|---|---|")


def load_runs(folder: str) -> list[dict]:
  runs = []
  for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
    with open(path) as f:
      try:
        r = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(r, dict) and "ppl_ratio" in r:
      runs.append(r)
  return sorted(runs, key=lambda r: (r["ppl_ratio"], r["name"]))


def table(runs: list[dict]) -> str:
  rows = [f"| {r['name']} | {r['tokens']:,} | {r['ppl']:.2f} | {r['ppl_ratio']:.3f} | "
          f"{100 * r['top1']:.1f}% | {r['wall_seconds']:.0f} s | {r['machine']} |" for r in runs]
  return "\n".join([HEADER] + rows)


def baseline_ratio(folder: str):
  """Perplexity ratio of the sliding-window baseline, from the quick suite's JSON if there
  (`linjax eval --suite quick` keys its results by model name)."""
  path = os.path.join(folder, "eval_quick_baselines.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    res = json.load(f)
  ppl = {k: v.get("perplexity") for k, v in res.items() if isinstance(v, dict)}
  teacher = next((v for k, v in ppl.items() if "teacher" in k), None)
  sw = next((v for k, v in ppl.items() if k.startswith("sw")), None)
  return sw / teacher if teacher and sw else None


def plot(runs: list[dict], path: str, baseline=None) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import NullFormatter

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for r in runs:
    for ax, y in ((a1, r["ppl_ratio"]), (a2, 100 * r["top1"])):
      ax.scatter(r["tokens"], y, s=40)
      ax.annotate(r["name"], (r["tokens"], y), fontsize=7, xytext=(4, 3),
                  textcoords="offset points")
  a1.axhline(TARGET_RATIO, color="green", ls="--", lw=1, label=f"target {TARGET_RATIO}")
  a1.axhline(1.0, color="gray", lw=0.8, label="teacher")
  if baseline:
    a1.axhline(baseline, color="orange", ls=":", lw=1.2,
               label=f"sliding window 64 + 4 sinks ({baseline:.2f})")
  a1.set_yscale("log")
  a1.set_ylabel("held-out perplexity / teacher's")
  a2.set_ylabel("top-1 agreement with the teacher (%)")
  for ax in (a1, a2):
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
    ax.set_xlabel("training tokens")
    ax.grid(alpha=0.3, which="both")
  a1.legend(fontsize=7)
  fig.suptitle("Linearized SmolLM2-135M: quality vs training tokens")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m linjax.linearize.summary", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("folder", nargs="?", default="experiments/results")
  p.add_argument("--png", default=None, help="default: <folder>/linearization.png")
  args = p.parse_args(argv)
  runs = load_runs(args.folder)
  if not runs:
    raise SystemExit(f"no recipe results (JSON with a ppl_ratio) in {args.folder}")
  print(table(runs))
  png = plot(runs, args.png or os.path.join(args.folder, "linearization.png"),
             baseline_ratio(args.folder))
  print(f"saved {png}")


if __name__ == "__main__":
  main()
