"""From scratch at equal parameters and equal tokens (CPU): dense Llama, low-rank FFN Llama,
"wide and structured" Llama, GLA, and the recurrent transformer, on the embedded corpus
(byte tokenizer) and on the copy and selective-copy tasks of the recurrent-transformer paper.

  python experiments/fromscratch_cpu.py --workdir /tmp/fromscratch     # every model x task,
      # then experiments/results/fromscratch_cpu.{md,png,json}
  python -m linjax.train --config experiments/fromscratch_cpu.py:cpu-rt-text \\
      --workdir /tmp/fromscratch/rt-text                               # one run

Args: "cpu" (= "cpu-dense-text") or "cpu-<model>-<task>":
  models (~2.4M parameters each, 259-byte vocabulary, tied embeddings)
    dense    Llama, 3 layers, hidden 256, FFN 768 (SwiGLU), 4 heads / 2 kv heads
    lowrank  the same width with low-rank FFNs (rank 128) and 4 layers (the parameters the
             FFNs save buy a layer)
    wide     "wide and structured" (Wei et al.): hidden 320, FFN 960 at rank 140, 5 heads /
             1 kv head, 3 layers
    gla      the dense Llama with every mixer GLA
    rt       the recurrent transformer: one block, hidden 448, FFN 1120, 7 heads, window 32
  tasks (the same token budget for every model)
    text     the embedded corpus, 256-byte rows; the rt run uses the length curriculum
             (stages at 64, 128 and 256 bytes: 1/4, 1/4, 1/2 of the tokens)
    copy     8 symbols (of 8), 110 blanks, '|', the 8 symbols again: 127 bytes + EOS a row
    selcopy  8 symbols at random places among 118 blanks, '|', the symbols in order
The copy answer sits 111-119 positions after its symbol: beyond the recurrent
transformer's step (2w = 64 positions), so it must come through the carried state.
Accuracy: teacher-forced argmax of the 8 answer bytes on 256 held-out rows (per symbol, and
whole rows). The task files are written once under $LINJAX_CACHE/fromscratch.
"""
from __future__ import annotations

import json
import os

import numpy as np

from linjax.train.config import base_config, stage, stages, tiny_llama_dict

LLAMA = dict(tiny_llama_dict(), hidden_size=256, intermediate_size=768, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "dense": dict(LLAMA),
    "lowrank": dict(LLAMA, num_hidden_layers=4, mlp="lowrank", mlp_rank=128),
    "wide": dict(LLAMA, hidden_size=320, intermediate_size=960, num_attention_heads=5,
                 num_key_value_heads=1, mlp="lowrank", mlp_rank=140),
    "gla": dict(LLAMA, mixers="gla"),
    "rt": dict(vocab_size=259, hidden_size=448, intermediate_size=1120, num_hidden_layers=1,
               num_attention_heads=7, num_key_value_heads=7, window=32),
}
TASKS = ("text", "copy", "selcopy")
TOKENS = {"text": 409_600, "copy": 262_144, "selcopy": 262_144}
K, ROW = 8, 128                           # answer symbols, task row length (with EOS)
SYMBOLS = "abcdefgh"


def cache_root() -> str:
  root = os.environ.get("LINJAX_CACHE", os.path.expanduser("~/.cache/linjax"))
  return os.path.join(root, "fromscratch")


def task_text(task: str, rng) -> str:
  sym = "".join(rng.choice(list(SYMBOLS), K))
  if task == "copy":
    body = sym + "." * (ROW - 2 - 2 * K)
  else:
    n = ROW - 2 - K
    body = ["."] * n
    for p, s in zip(sorted(rng.choice(n, K, replace=False)), sym):
      body[p] = s
    body = "".join(body)
  return body + "|" + sym


def task_files(task: str, n_train: int = 4096, n_eval: int = 256) -> tuple[str, str]:
  """(train, eval) jsonl files of `task`, written once (seeded)."""
  folder = os.path.join(cache_root(), "tasks")
  os.makedirs(folder, exist_ok=True)
  out = []
  for split, n, seed in (("train", n_train, 0), ("eval", n_eval, 1)):
    path = os.path.join(folder, f"{task}_{split}.jsonl")
    if not os.path.exists(path):
      rng = np.random.RandomState(seed + (10 if task == "selcopy" else 0))
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        for _ in range(n):
          f.write(json.dumps({"text": task_text(task, rng)}) + "\n")
      os.replace(tmp, path)
    out.append(path)
  return tuple(out)


def rt_init(seed: int = 0) -> str:
  """A random-init recurrent transformer saved as a linjax checkpoint (the trainer builds
  only Llamas from `model.tiny`; any saved linjax model enters through `model.source`)."""
  from flax import nnx
  from linjax.convert import save_linjax
  from linjax.models.recurrent_transformer import (RecurrentTransformer,
                                                   RecurrentTransformerConfig)
  import hashlib
  cfg = RecurrentTransformerConfig(**MODELS["rt"])
  key = hashlib.sha1(json.dumps(cfg.to_hf(), sort_keys=True).encode()).hexdigest()[:10]
  path = os.path.join(cache_root(), f"rt_init_{key}_seed{seed}")
  if not os.path.isdir(os.path.join(path, "state")):
    save_linjax(RecurrentTransformer(cfg, rngs=nnx.Rngs(params=seed)), path)
  return path


def get_config(arg: str = "cpu"):
  parts = ("cpu", "dense", "text") if arg == "cpu" else tuple(arg.split("-"))
  if len(parts) != 3 or parts[0] != "cpu" or parts[1] not in MODELS or parts[2] not in TASKS:
    raise ValueError(f"unknown arg {arg!r}; 'cpu' or 'cpu-<model>-<task>' with model in "
                     f"{sorted(MODELS)} and task in {TASKS}")
  _, model, task = parts
  config = base_config()
  config.progress = False
  config.data.tokenizer = "byte"
  if model == "rt":
    config.model.source = rt_init(config.seed)
  else:
    config.model.source = "tiny"
    config.model.tiny = dict(MODELS[model])
  optim = {"lr": 2e-3, "warmup_steps": 20, "schedule": "cosine", "weight_decay": 0.01}
  if task == "text":
    seq, batch = 256, 8
    common = dict(batch_size=batch, log_every=10, eval_every=10, eval_rows=16, ckpt_every=0)
    if model == "rt":          # the length curriculum: same tokens, shorter rows first
      budget = TOKENS["text"]
      config.stages = stages(**{
          f"len{s}": stage(steps=b // (batch * s), seq_len=s, **common,
                           optim=dict(optim, warmup_steps=20 if s == 64 else 0))
          for s, b in ((64, budget // 4), (128, budget // 4), (256, budget // 2))})
    else:
      config.stages = stages(train=stage(steps=TOKENS["text"] // (batch * seq), seq_len=seq,
                                         optim=optim, **common))
  else:
    train_f, eval_f = task_files(task)
    config.data.path, config.data.eval_path = train_f, eval_f
    batch = 16
    config.stages = stages(train=stage(
        steps=TOKENS[task] // (batch * ROW), seq_len=ROW, batch_size=batch, log_every=10,
        eval_every=0, eval_rows=16, ckpt_every=0, optim=optim))
  return config


# --------------------------------------------------------------------------- the full run

def task_accuracy(model, task: str) -> dict:
  """Teacher-forced argmax accuracy on the answer bytes of the held-out rows."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from linjax.data.tokenizers import ByteTokenizer
  tok = ByteTokenizer()
  _, eval_f = task_files(task)
  rows = [tok.encode(json.loads(l)["text"]) for l in open(eval_f)]
  x = jnp.asarray(np.asarray(rows, np.int32))                 # [N, 127]
  f = nnx.jit(lambda m, t: jnp.argmax(m(t)[0], -1))
  preds = np.concatenate([np.asarray(f(model, x[i:i + 64])) for i in range(0, len(rows), 64)])
  ans = slice(x.shape[1] - 1 - K, x.shape[1] - 1)             # predictions of the K answers
  hit = preds[:, ans] == np.asarray(x)[:, ans.start + 1:]
  return {"acc": float(hit.mean()), "exact": float(hit.all(1).mean())}


def heldout_loss(model, n_rows: int = 16, seq_len: int = 256) -> float:
  """Mean next-byte cross-entropy (nats) on the first held-out rows, every model alike."""
  from linjax.data.tokenizers import ByteTokenizer
  from linjax.eval.metrics import perplexity
  from linjax.data.streams import heldout_tokens
  toks = heldout_tokens(ByteTokenizer(), n_rows * seq_len).reshape(n_rows, seq_len)
  return perplexity(model, toks, seq_len=seq_len, batch_size=8).nll


def curve(workdir: str) -> list:
  """[(tokens seen, validation loss)] over the stages of a run."""
  out, seen = [], 0
  folder = os.path.join(workdir, "stages")
  for name in sorted(os.listdir(folder), key=lambda s: int(s.split("_")[0])):
    rows = [json.loads(l) for l in open(os.path.join(folder, name, "metrics.jsonl"))]
    cfg_tokens = {r["step"]: r for r in rows if r["split"] == "train"}
    per_step = None
    for r in rows:
      if r["split"] == "val":
        if per_step is None:
          per_step = _tokens_per_step(workdir, name)
        out.append((seen + r["step"] * per_step, r["loss"]))
    last = max(cfg_tokens) if cfg_tokens else 0
    seen += last * (per_step or _tokens_per_step(workdir, name))
  return out


def _tokens_per_step(workdir, stage_dir):
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  name = stage_dir.split("_", 1)[1]
  st = cfg["stages"][name]
  return int(st["seq_len"]) * int(st["batch_size"])


def main(argv=None):
  import argparse
  import time
  import linjax
  from linjax.layers.params import param_count
  from linjax.train import train
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results", "fromscratch_cpu"))
  a = p.parse_args(argv)
  res_path = a.results + ".json"
  res = json.load(open(res_path)) if os.path.exists(res_path) else {}
  for task in a.tasks.split(","):
    for model in a.models.split(","):
      key = f"{model}-{task}"
      t0 = time.time()
      wd = os.path.join(a.workdir, key)
      summary = train(get_config(f"cpu-{key}"), wd)
      m = summary["model"]
      row = {"params": param_count(m), "wall_s": time.time() - t0,
             "tokens": sum(s["tokens"] for s in summary["stages"]),
             "train_s": sum(s.get("train_seconds") or 0 for s in summary["stages"])}
      if task == "text":
        row["heldout_loss"] = heldout_loss(m)
        row["curve"] = curve(wd)
      else:
        row.update(task_accuracy(m, task))
      print(key, {k: v for k, v in row.items() if k != "curve"}, flush=True)
      res[key] = row
      res["_meta"] = {"machine": f"{os.cpu_count()}-core {os.uname().machine}",
                      "date": time.strftime("%Y-%m-%d"),
                      "load": f"load {os.getloadavg()[0]:.1f} after the last run"}
      with open(res_path, "w") as f:
        json.dump(res, f, indent=1)
  write_report(res, a.results)


NAMES = {"dense": "dense Llama (3 x 256)", "lowrank": "low-rank FFN Llama (4 x 256, r 128)",
         "wide": "wide + structured (3 x 320, r 140, MQA)", "gla": "GLA Llama (3 x 256)",
         "rt": "recurrent transformer (1 x 448, w 32)"}


def write_report(res: dict, base: str):
  meta = res.get("_meta", {})
  lines = [
      "# From scratch at equal parameters and tokens (CPU, byte tokenizer)\n",
      f"`python experiments/fromscratch_cpu.py --workdir DIR` ({meta.get('date', '?')}, "
      f"{meta.get('machine', '?')} CPU, {meta.get('load', 'load ?')}). Every model trains with the "
      "project's trainer, AdamW lr 2e-3, cosine, 20 warmup steps. text: "
      f"{TOKENS['text']:,} tokens of the embedded corpus (8 x 256-byte rows a step; the "
      "recurrent transformer's in a 64 -> 128 -> 256 byte length curriculum); held-out loss: "
      "mean next-byte cross-entropy on 16 x 256 bytes of the held-out split. copy / selective "
      f"copy: {TOKENS['copy']:,} tokens (16 x 128 a step), accuracy of the 8 answer bytes "
      "(teacher-forced argmax) on 256 held-out rows, per symbol and whole rows; chance is "
      "1/8 per symbol.\n",
      "| model | params | text held-out loss (nats/byte) | text train s | copy acc | copy "
      "exact | selective copy acc | selective copy exact |",
      "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for m in MODELS:
    t, c, s = res.get(f"{m}-text", {}), res.get(f"{m}-copy", {}), res.get(f"{m}-selcopy", {})
    if not (t or c or s):
      continue
    params = (t or c or s)["params"]
    f = lambda d, k, fmt: format(d[k], fmt) if k in d else "-"
    lines.append(f"| {NAMES[m]} | {params:,} | {f(t, 'heldout_loss', '.3f')} | "
                 f"{f(t, 'train_s', '.0f')} | {f(c, 'acc', '.3f')} | {f(c, 'exact', '.3f')} | "
                 f"{f(s, 'acc', '.3f')} | {f(s, 'exact', '.3f')} |")
  lines.append(f"\n![held-out loss curves]({os.path.basename(base)}.png)\n")
  lines.append("Validation points of the curriculum run before its last stage are on shorter "
               "rows (64 / 128 bytes), hence higher than at 256 bytes of context.")
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for m in MODELS:
    cur = res.get(f"{m}-text", {}).get("curve")
    if cur:
      xs, ys = zip(*cur)
      ax.plot(np.asarray(xs) / 1e3, ys, label=NAMES[m], lw=1.4)
  ax.set_xlabel("training tokens (thousands)")
  ax.set_ylabel("validation loss (nats / byte)")
  ax.set_title("From scratch, ~2.4M parameters each, embedded corpus")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(base + ".png", dpi=120)


if __name__ == "__main__":
  main()
