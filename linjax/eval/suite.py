"""`linjax.evaluate`: the evaluation suites, several models against one teacher in one pass.

Suites fix every size so numbers are comparable between runs and models:

  quick  the held-out split of the embedded corpus (`linjax.data.corpus`: stdlib docstrings
         that share no 13-gram with any training split), its first 32,768 tokens in 64
         windows of 512: perplexity, top-1 agreement with the teacher and mean
         KL(teacher || student) per token; MQAR (8 pairs, 8 queries a row) and passkey at
         128 / 256 / 512 tokens, 64 rows each. 95% intervals: Wilson for accuracies,
         a normal interval over the windows for top-1 and KL.
  demo   8,192 held-out tokens and 16 recall rows at 128 / 512 tokens: what `make demo`
         prints at its end (a quick estimate; the committed results use "quick").
  tiny   toy sizes, for tests and notebooks.

`evaluate_models(models, teacher, tokenizer, suite)` runs the teacher once per batch and
every model on the same batch, so a student and its baselines cost one teacher pass.
`evaluate(model, tokenizer=..., teacher=...)` is the one-model form. Every model is anything
`model(tokens, positions=, segment_ids=) -> logits` (a linjax model or a function).
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from linjax.data.streams import heldout_tokens
from linjax.eval import recall
from linjax.eval.metrics import split_model


@dataclasses.dataclass(frozen=True)
class Suite:
  ppl_seq_len: int = 512
  ppl_windows: int = 64
  context_lens: tuple = (128, 256, 512)
  mqar_examples: int = 64
  mqar_pairs: int = 8
  passkey_examples: int = 64
  passkey_depths: tuple = (0.1, 0.5, 0.9)
  batch_size: int = 8
  seed: int = 0


SUITES = {
    "quick": Suite(),
    "demo": Suite(ppl_windows=16, context_lens=(128, 512), mqar_examples=16,
                  passkey_examples=16),
    "tiny": Suite(ppl_seq_len=64, ppl_windows=4, context_lens=(96, 128), mqar_examples=4,
                  mqar_pairs=4, passkey_examples=4, batch_size=2),
}


def get_suite(suite) -> Suite:
  if isinstance(suite, Suite):
    return suite
  if suite not in SUITES:
    raise ValueError(f"unknown suite {suite!r}; available: {sorted(SUITES)}")
  return SUITES[suite]


# ----------------------------------------------------------------------------- intervals

def wilson(k: int, n: int, z: float = 1.96) -> tuple:
  """95% Wilson score interval of a binomial proportion k / n."""
  if n == 0:
    return (float("nan"), float("nan"))
  p = k / n
  d = 1 + z * z / n
  c = (p + z * z / (2 * n)) / d
  h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return (c - h, c + h)


def mean_interval(values, z: float = 1.96) -> tuple:
  """Mean of per-window values and its normal 95% interval."""
  v = np.asarray(values, np.float64)
  m = float(v.mean())
  h = z * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
  return m, (m - h, m + h)


# ----------------------------------------------------------------------------- the pass

def _stats_fn(static, state):
  """jit((tokens, positions, segment_ids, teacher log-probs or None)) -> per-position nll,
  argmax and KL(teacher || model)."""
  import functools

  import jax
  import jax.numpy as jnp

  @functools.partial(jax.jit, static_argnums=(0, 6))
  def run(static, state, tok, pos, seg, t_logp, want_logp):
    from linjax.eval.metrics import _forward
    logits = _forward(static, state, tok, pos, seg)
    logp = jax.nn.log_softmax(logits, -1)
    nxt = jnp.concatenate([tok[:, 1:], jnp.zeros_like(tok[:, :1])], 1)
    nll = -jnp.take_along_axis(logp, nxt[..., None], -1)[..., 0]
    kl = None if t_logp is None else (jnp.exp(t_logp) * (t_logp - logp)).sum(-1)
    return nll, jnp.argmax(logits, -1).astype(jnp.int32), kl, (logp if want_logp else None)

  return lambda tok, pos, seg, t_logp=None, want_logp=False: run(static, state, tok, pos, seg,
                                                                 t_logp, want_logp)


def _windows(tokens, s: Suite):
  T = s.ppl_seq_len
  rows = tokens.reshape(-1, T)
  for i in range(0, len(rows), s.batch_size):
    chunk = rows[i:i + s.batch_size]
    n = len(chunk)
    tok = np.zeros((s.batch_size, T), np.int32)
    tok[:n] = chunk
    seg = np.zeros((s.batch_size, T), np.int32)
    seg[:n] = 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), tok.shape).copy()
    yield tok, pos, seg, n


def evaluate_models(models: dict, *, tokenizer, teacher=None, suite="quick",
                    progress: bool = False, recall_tasks: bool = True) -> dict:
  """Every metric of `suite` for each of `models` ({name: model}; the teacher is scored as
  well, under "teacher", when given). Returns {name: result} with result keys:

    perplexity, nll, ppl_tokens, ppl_ratio (to the teacher's)
    top1_agreement, top1_ci, kl, kl_ci         (against the teacher)
    mqar / passkey: {context_len: accuracy}, mqar_ci / passkey_ci: {context_len: (lo, hi)},
    items: {task: {context_len: n}}
  """
  s = get_suite(suite)
  t0 = time.time()
  n_tok = s.ppl_seq_len * s.ppl_windows
  toks = heldout_tokens(tokenizer, n_tok)
  all_models = ({"teacher": teacher} if teacher is not None else {}) | dict(models)
  fns = {n: _stats_fn(*split_model(m)) for n, m in all_models.items()}
  acc = {n: {"nll": 0.0, "n": 0, "agree": [], "kl": []} for n in all_models}
  batches = list(_windows(toks, s))
  it = batches
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(batches, desc=f"held-out ({len(all_models)} models)", unit="batch")
  for tok, pos, seg, n in it:
    mask = np.zeros(tok.shape, bool)
    mask[:n, :-1] = True                      # the last position predicts nothing here
    t_logp, t_arg = None, None
    if teacher is not None:
      nll, t_arg, _, t_logp = fns["teacher"](tok, pos, seg, want_logp=True)
      a = acc["teacher"]
      a["nll"] += float(np.asarray(nll)[mask].sum())
      a["n"] += int(mask.sum())
      t_arg = np.asarray(t_arg)
    for name in models:
      nll, arg, kl, _ = fns[name](tok, pos, seg, t_logp)
      a = acc[name]
      a["nll"] += float(np.asarray(nll)[mask].sum())
      a["n"] += int(mask.sum())
      if teacher is not None:
        real = np.zeros(tok.shape, bool)
        real[:n] = True
        agree = (np.asarray(arg) == t_arg)
        kl = np.asarray(kl)
        for r in range(n):                    # per window: for the intervals
          a["agree"].append(float(agree[r][real[r]].mean()))
          a["kl"].append(float(kl[r][mask[r]].mean()))
  out = {}
  for name in all_models:
    a = acc[name]
    nll = a["nll"] / a["n"]
    r = {"perplexity": math.exp(nll), "nll": nll, "ppl_tokens": a["n"]}
    if a["agree"]:
      r["top1_agreement"], r["top1_ci"] = mean_interval(a["agree"])
      r["kl"], r["kl_ci"] = mean_interval(a["kl"])
    out[name] = r
  if teacher is not None:
    for name in models:
      out[name]["ppl_ratio"] = out[name]["perplexity"] / out["teacher"]["perplexity"]
  if recall_tasks:
    batches = recall_batches(tokenizer, s)
    bar = None
    if progress:   # one step per (model, task, length): each is a few forward batches
      from tqdm.auto import tqdm
      bar = tqdm(total=len(all_models) * sum(len(batches[t]) for t in ("mqar", "passkey")),
                 desc="recall", unit="set")
    for name, m in all_models.items():
      for task in ("mqar", "passkey"):
        res, ci, items = {}, {}, {}
        for L, b in batches[task].items():
          if bar is not None:
            bar.set_postfix_str(f"{name} {task}@{L}")
          hits = recall.recall_accuracy(m, b, batch_size=s.batch_size, per_example=True)
          if bar is not None:
            bar.update(1)
          used = _used(b)
          k, N = int(hits[used].sum()), int(used.sum())
          res[L], ci[L], items[L] = k / N, wilson(k, N), N
        out[name][task], out[name][task + "_ci"] = res, ci
        out[name].setdefault("items", {})[task] = items
      if progress:
        print(f"  recall {name}: MQAR {out[name]['mqar']} passkey {out[name]['passkey']} "
              f"({time.time() - t0:.0f}s)", flush=True)
    if bar is not None:
      bar.close()
  for r in out.values():
    r["suite"] = suite if isinstance(suite, str) else "custom"
    r["seconds"] = time.time() - t0
  return out


def _used(b):
  G = int(b.groups.max()) + 1
  used = np.zeros((b.tokens.shape[0], G), bool)
  for g in range(G):
    used[:, g] = np.any((b.groups == g) & b.answer_mask, axis=1)
  return used


def evaluate(model, *, tokenizer, teacher=None, suite="quick", verbose: bool = False) -> dict:
  """The suite on one model (and its teacher, if given): the model's result dict."""
  return evaluate_models({"model": model}, tokenizer=tokenizer, teacher=teacher, suite=suite,
                         progress=verbose)["model"]


def recall_batches(tokenizer, suite="quick") -> dict:
  """The suite's MQAR and passkey rows: {"mqar": {L: RecallBatch}, "passkey": {...}}.
  Filler text is validation text (the "val" split), distractors that no score uses."""
  s = get_suite(suite)
  keys, values = recall.word_pools(tokenizer)
  sep = recall.encode(tokenizer, ",")
  sep_id = sep[0] if len(sep) == 1 else None
  filler = heldout_tokens(tokenizer, 4 * max(s.context_lens) + 1024, split="val")
  out = {"mqar": {}, "passkey": {}}
  for L in s.context_lens:
    out["mqar"][L] = recall.make_mqar(
        num_examples=s.mqar_examples, context_len=L, num_pairs=s.mqar_pairs, key_ids=keys,
        value_ids=values, sep_id=sep_id, filler_ids=filler, seed=s.seed + L)
    out["passkey"][L] = recall.make_passkey(
        tokenizer, num_examples=s.passkey_examples, context_len=L, depths=s.passkey_depths,
        seed=s.seed + L)
  return out


def baseline_models(teacher, specs, student=None) -> dict:
  """{"sliding window W + S sinks": model} for specs like "sliding_window:64:4"; with a
  fourth field "kept" ("sliding_window:64:4:kept"), only the layers that `student` does not
  keep as softmax attention become windows (the baseline of a student with softmax layers)."""
  from linjax.linearize import linearize
  out = {}
  for spec in specs:
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] != "sliding_window" or parts[3:] not in ([], ["kept"]):
      raise ValueError(f"baseline spec {spec!r}: expected 'sliding_window:<window>:<sinks>' "
                       "or 'sliding_window:<window>:<sinks>:kept'")
    kind, w, sinks = parts[:3]
    name = f"sliding window {int(w)} + {int(sinks)} sinks"
    layers = None
    if parts[3:] == ["kept"]:
      if student is None:
        raise ValueError(f"baseline spec {spec!r} needs the student (its softmax layers)")
      mixers = student.config.mixers
      layers = [i for i, m in enumerate(mixers) if m not in ("softmax", "attention")]
      kept = [i for i in range(len(mixers)) if i not in layers]
      name += f", softmax in layers {kept}"
    out[name] = linearize(teacher, kind, layers, window=int(w), num_sinks=int(sinks))
  return out


def evaluate_run(student, teacher, tokenizer, *, suite="quick", baselines=(), workdir=None,
                 progress=False) -> dict:
  """The end-of-run evaluation of the trainer: the student, its baselines and the teacher,
  as a dict, plus `evaluation.md` / `evaluation.json` / `recall.png` in `workdir`."""
  import json
  import os
  models = {"student": student} | baseline_models(teacher, baselines, student)
  res = evaluate_models(models, tokenizer=tokenizer, teacher=teacher, suite=suite,
                        progress=progress)
  if workdir:
    with open(os.path.join(workdir, "evaluation.md"), "w") as f:
      f.write(results_table(res) + "\n")
    with open(os.path.join(workdir, "evaluation.json"), "w") as f:
      json.dump(res, f, indent=1, default=str)
    plot_recall(res, os.path.join(workdir, "recall.png"))
  return res


# ----------------------------------------------------------------------------- reporting

def results_table(results: dict[str, dict]) -> str:
  """A markdown table, one row per model: perplexity (ratio), top-1 agreement and KL with
  their intervals, recall by length."""
  lens = sorted({L for r in results.values() for t in ("mqar", "passkey") for L in r.get(t, {})})
  head = (["model", "perplexity", "ratio", "top-1 agr. (95% CI)", "KL (95% CI)"]
          + [f"MQAR@{L}" for L in lens] + [f"passkey@{L}" for L in lens])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    agr, kl = r.get("top1_agreement"), r.get("kl")
    cells = [name, f"{r['perplexity']:.2f}",
             f"{r['ppl_ratio']:.3f}" if "ppl_ratio" in r else "-",
             "-" if agr is None else f"{agr:.3f} ({r['top1_ci'][0]:.3f}-{r['top1_ci'][1]:.3f})",
             "-" if kl is None else f"{kl:.3f} ({r['kl_ci'][0]:.3f}-{r['kl_ci'][1]:.3f})"]
    cells += [f"{r['mqar'][L]:.2f}" if L in r.get("mqar", {}) else "-" for L in lens]
    cells += [f"{r['passkey'][L]:.2f}" if L in r.get("passkey", {}) else "-" for L in lens]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def plot_recall(results: dict[str, dict], path: str) -> str:
  """PNG of recall accuracy vs context length with 95% intervals: MQAR (solid) and passkey
  (dashed), one colour per model. Returns `path`."""
  from matplotlib.figure import Figure   # no pyplot: leaves the caller's backend alone
  fig = Figure(figsize=(6.5, 4))
  ax = fig.subplots()
  for i, (name, r) in enumerate(results.items()):
    c = f"C{i}"
    for task, ls in (("mqar", "-"), ("passkey", "--")):
      xs = sorted(r.get(task, {}))
      if not xs:
        continue
      ys = [r[task][x] for x in xs]
      ax.plot(xs, ys, ls, marker="o", color=c, label=f"{name} {task}")
      if task + "_ci" in r:
        lo = [r[task + "_ci"][x][0] for x in xs]
        hi = [r[task + "_ci"][x][1] for x in xs]
        ax.fill_between(xs, lo, hi, color=c, alpha=0.12)
  ax.set_xscale("log", base=2)
  lens = sorted({L for r in results.values() for t in ("mqar", "passkey") for L in r.get(t, {})})
  ax.set_xticks(lens, [str(L) for L in lens])
  ax.minorticks_off()
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("recall accuracy")
  ax.set_ylim(-0.05, 1.05)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title("In-context recall vs context length (95% intervals)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
