"""The linearization results table and plot, from trainer runs and one evaluation of them.

    linjax eval --teacher smollm2 --model runs/lolcats_paper_15m --model runs/... \
        --baseline sliding_window:64:4 --baseline sliding_window:128:4 --suite quick --out E
    python -m linjax.linearize.summary --eval E/results.json --runs runs/lolcats_paper_15m \
        runs/... --out experiments/results/linearization

Each run is a trainer workdir (its summary.json gives the recipe, the training tokens per
stage and the wall time); the evaluation (`linjax eval`, models named by their workdir's
basename, the teacher and the no-training baselines scored in the same pass) gives the
held-out numbers. Writes `<out>.md` (one row per model: training tokens, wall time,
perplexity ratio, top-1 agreement and KL with 95% intervals, passkey and MQAR by length) and
`<out>.png` (ratio, top-1 and KL against training tokens, the baselines as lines), and
prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os


def load_run(workdir: str) -> dict:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir}: no summary.json (not a finished trainer run)")
  with open(path) as f:
    s = json.load(f)
  stages = s.get("stages", [])
  return {"name": os.path.basename(os.path.normpath(workdir)),
          "tokens": sum(int(x.get("tokens", 0)) for x in stages),
          "stage_tokens": {x["stage"]: int(x.get("tokens", 0)) for x in stages},
          "wall_s": float(s.get("wall_s", 0.0)),
          "mixer": (s.get("config", {}).get("linearize") or {}).get("mixer", "softmax")}


def _ci(r, key):
  v, ci = r.get(key), r.get({"top1_agreement": "top1_ci"}.get(key, key + "_ci"))
  if v is None:
    return "-"
  return f"{v:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci else f"{v:.3f}"


def table(evaluation: dict, runs: dict) -> str:
  lens = sorted({int(L) for r in evaluation.values() for L in r.get("passkey", {})})
  head = (["model", "training tokens", "wall", "ppl", "ratio", "top-1 (95% CI)", "KL (95% CI)"]
          + [f"passkey@{L}" for L in lens] + [f"MQAR@{L}" for L in lens])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def order(item):
    name, r = item
    return (name in runs, -(r.get("top1_agreement") or 2.0))
  for name, r in sorted(evaluation.items(), key=order):
    run = runs.get(name)
    cells = [name, "-" if run is None else f"{run['tokens']:,}",
             "-" if run is None else f"{run['wall_s'] / 60:.1f} min",
             f"{r['perplexity']:.2f}", f"{r['ppl_ratio']:.3f}" if "ppl_ratio" in r else "-",
             _ci(r, "top1_agreement"), _ci(r, "kl")]
    get = lambda task, L: r.get(task, {}).get(str(L), r.get(task, {}).get(L))
    cells += [f"{get('passkey', L):.2f}" if get("passkey", L) is not None else "-" for L in lens]
    cells += [f"{get('mqar', L):.2f}" if get("mqar", L) is not None else "-" for L in lens]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def plot(evaluation: dict, runs: dict, path: str) -> str:
  from matplotlib.figure import Figure   # no pyplot: leaves the caller's backend alone
  from matplotlib.ticker import NullFormatter
  fig = Figure(figsize=(15, 4.3))
  axes = fig.subplots(1, 3)
  keys = (("ppl_ratio", "held-out perplexity / teacher's"),
          ("top1_agreement", "top-1 agreement with the teacher"),
          ("kl", "KL(teacher || model) per token (nats)"))
  baselines = {n: r for n, r in evaluation.items() if n not in runs and n != "teacher"}
  for ax, (k, label) in zip(axes, keys):
    for i, (n, r) in enumerate(sorted(baselines.items())):
      if k in r:
        ax.axhline(r[k], color=f"C{i + 5}", ls=":", lw=1.3, label=n)
    for name, run in runs.items():
      r = evaluation.get(name)
      if r is None or k not in r:
        continue
      ci = r.get({"top1_agreement": "top1_ci"}.get(k, k + "_ci"))
      yerr = None if not ci else [[r[k] - ci[0]], [ci[1] - r[k]]]
      ax.errorbar(run["tokens"], r[k], yerr=yerr, fmt="o", ms=5, capsize=2)
      ax.annotate(name, (run["tokens"], r[k]), fontsize=6, xytext=(3, 3),
                  textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1e3)      # untrained (step-0) models sit at 0
    ax.xaxis.set_minor_formatter(NullFormatter())
    if k != "top1_agreement":
      ax.set_yscale("log")
    ax.set_xlabel("training tokens (0: untrained)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, which="both")
  axes[0].axhline(1.0, color="gray", lw=0.8)
  axes[1].legend(fontsize=7, loc="lower right")
  fig.suptitle("Linearized SmolLM2-135M on the held-out split: quality vs training tokens")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def _same_scores(a: dict, b: dict) -> bool:
  """Two rows of one model scored on the same tokens: equal up to float reassociation between
  runs (other batch compositions move the 7th digit)."""
  close = lambda k: math.isclose(a.get(k) or 0.0, b.get(k) or 0.0, rel_tol=1e-6)
  return (all(close(k) for k in ("perplexity", "top1_agreement", "kl"))
          and all(a.get(k) == b.get(k) for k in ("ppl_tokens", "passkey", "mqar")))


def merge_evaluations(paths, students=None) -> dict:
  """The models of several `linjax eval` results in one dict. They are comparable only when
  scored on the same held-out tokens against the same teacher, so the teacher's rows must be
  equal (perplexity to 1e-6 relative); a model in two files (the teacher, a baseline every run
  scored) joins once and must have the same scores in both. `students` ({path: name}): a
  trainer's own evaluation.json names its model "student"; it joins under that name."""
  merged, source = {}, {}
  for path in paths:
    with open(path) as f:
      ev = json.load(f)
    if (students or {}).get(path) and "student" in ev:
      ev[students[path]] = ev.pop("student")
    for name, r in ev.items():
      if name in merged:
        if not _same_scores(merged[name], r):
          if name == "teacher":
            raise ValueError(f"{path} and {source[name]} score the teacher differently "
                             "(another suite, tokens or teacher): their models are not "
                             "comparable")
          raise ValueError(f"model {name!r} is in {path} and in {source[name]} with "
                           "different scores")
        continue
      merged[name], source[name] = r, path
  return merged


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m linjax.linearize.summary", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--eval", required=True, nargs="+",
                 help="results.json of `linjax eval` (several: merged, they must share the "
                 "teacher's numbers), or trainer workdirs' evaluation.json (each workdir "
                 "also in --runs: its model is named after it)")
  p.add_argument("--runs", nargs="*", default=[], help="trainer workdirs")
  p.add_argument("--out", required=True, help="output path stem (writes .md and .png)")
  args = p.parse_args(argv)
  runs = {r["name"]: r for r in map(load_run, args.runs)}
  # a trainer's own end-of-run evaluation.json (in its workdir): its "student" is that run
  students = {p: os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.eval}
  students = {p: n for p, n in students.items() if n in runs}
  if len(runs) == 1 and len(args.eval) == 1 and not students:
    students = {args.eval[0]: next(iter(runs))}
  evaluation = merge_evaluations(args.eval, students)
  missing = sorted(set(runs) - set(evaluation))
  if missing:
    raise ValueError(f"runs not in {' / '.join(args.eval)}: {missing} (evaluate them with "
                     "linjax eval)")
  text = table(evaluation, runs)
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(text + "\n")
  print(f"saved {plot(evaluation, runs, args.out + '.png')} and {args.out}.md")
  return text


if __name__ == "__main__":
  main()
