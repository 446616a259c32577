"""`linjax.evaluate`: the quick suite (perplexity, top-1 agreement, MQAR, passkey) as a dict.

Suites fix every size so numbers are comparable between runs and models:

  quick  perplexity on 6 x 512 held-out tokens (the embedded corpus' "heldout" split:
         CPython pydoc topics no training run sees); top-1 agreement with the teacher on
         the same tokens; MQAR (8 pairs) and passkey at 128 / 256 / 512 tokens, 8 rows each.
         A few minutes per 135M model on a laptop CPU.
  tiny   the same at toy sizes, for tests and notebooks (seconds on a tiny model).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from linjax.eval import recall
from linjax.eval.metrics import perplexity, top1_agreement


@dataclasses.dataclass(frozen=True)
class Suite:
  ppl_seq_len: int = 512
  ppl_windows: int = 6
  context_lens: tuple = (128, 256, 512)
  mqar_examples: int = 8
  mqar_pairs: int = 8
  passkey_examples: int = 8
  passkey_depths: tuple = (0.1, 0.5, 0.9)
  batch_size: int = 4
  seed: int = 0


SUITES = {
    "quick": Suite(),
    "tiny": Suite(ppl_seq_len=64, ppl_windows=2, context_lens=(96, 128), mqar_examples=4,
                  mqar_pairs=4, passkey_examples=2, batch_size=2),
}


def heldout_texts() -> list[str]:
  """The held-out embedded text: `linjax.train.corpus.embedded_corpus("heldout")`, or the
  same pydoc topics directly if the training package is unavailable."""
  try:
    from linjax.train.corpus import embedded_corpus
    return [d["text"] for d in embedded_corpus("heldout")]
  except (ImportError, AttributeError):
    from pydoc_data.topics import topics
    keys = sorted(topics)[7::8]
    return [topics[k].strip() for k in keys if topics[k].strip()]


def heldout_tokens(tokenizer, n_tokens: int) -> np.ndarray:
  """The first `n_tokens` tokens of the held-out documents, joined by EOS when the
  tokenizer has one. Raises ValueError when the text is too short."""
  eos = getattr(tokenizer, "eos_token_id", None)
  out: list[int] = []
  for text in heldout_texts():
    out += recall.encode(tokenizer, text)
    if eos is not None:
      out.append(eos)
    if len(out) >= n_tokens:
      return np.asarray(out[:n_tokens], np.int32)
  raise ValueError(f"held-out text has {len(out)} tokens, fewer than {n_tokens}")


def _get_suite(suite) -> Suite:
  if isinstance(suite, Suite):
    return suite
  if suite not in SUITES:
    raise ValueError(f"unknown suite {suite!r}; available: {sorted(SUITES)}")
  return SUITES[suite]


def recall_batches(tokenizer, suite: Suite | str = "quick") -> dict:
  """The suite's MQAR and passkey rows: {"mqar": {L: RecallBatch}, "passkey": {...}}.
  Filler text comes from the held-out corpus (after the tokens perplexity uses)."""
  s = _get_suite(suite)
  keys, values = recall.word_pools(tokenizer)
  sep = recall.encode(tokenizer, ",")
  sep_id = sep[0] if len(sep) == 1 else None
  n_ppl = s.ppl_seq_len * s.ppl_windows
  filler = heldout_tokens(tokenizer, n_ppl + 4 * max(s.context_lens))[n_ppl:]
  out = {"mqar": {}, "passkey": {}}
  for L in s.context_lens:
    out["mqar"][L] = recall.make_mqar(
        num_examples=s.mqar_examples, context_len=L, num_pairs=s.mqar_pairs, key_ids=keys,
        value_ids=values, sep_id=sep_id, filler_ids=filler, seed=s.seed + L)
    out["passkey"][L] = recall.make_passkey(
        tokenizer, num_examples=s.passkey_examples, context_len=L, depths=s.passkey_depths,
        seed=s.seed + L)
  return out


def evaluate(model, *, tokenizer, teacher=None, suite: Suite | str = "quick",
             verbose: bool = False) -> dict:
  """Run an evaluation suite on `model` (a linjax model; the teacher too if given).

  Args:
    model: a linjax model (softmax or linearized); any `model(tokens, positions=,
      segment_ids=) -> logits` works.
    tokenizer: its HF tokenizer (`encode(text, add_special_tokens=False)`, `eos_token_id`).
    teacher: optional reference model on the same tokenizer, for top-1 agreement.
    suite: "quick", "tiny" or a `Suite`.
  Returns:
    {"perplexity": float, "nll": float, "ppl_tokens": int,
     "top1_agreement": float (only with a teacher),
     "mqar": {context_len: accuracy}, "passkey": {context_len: accuracy},
     "suite": name, "seconds": float}
  Raises ValueError for an unknown suite or a tokenizer lacking single-token words.
  """
  s = _get_suite(suite)
  t0 = time.time()
  toks = heldout_tokens(tokenizer, s.ppl_seq_len * s.ppl_windows).reshape(s.ppl_windows, -1)
  ppl = perplexity(model, toks, seq_len=s.ppl_seq_len, batch_size=s.batch_size)
  out = {"perplexity": ppl.perplexity, "nll": ppl.nll, "ppl_tokens": ppl.num_tokens}
  if verbose:
    print(f"  perplexity {ppl.perplexity:.3f} ({time.time() - t0:.0f}s)", flush=True)
  if teacher is not None:
    out["top1_agreement"] = top1_agreement(model, teacher, toks, seq_len=s.ppl_seq_len,
                                           batch_size=s.batch_size)
  batches = recall_batches(tokenizer, s)
  for task in ("mqar", "passkey"):
    out[task] = {L: recall.recall_accuracy(model, b, batch_size=s.batch_size)
                 for L, b in batches[task].items()}
    if verbose:
      print(f"  {task} {out[task]} ({time.time() - t0:.0f}s)", flush=True)
  out["suite"] = suite if isinstance(suite, str) else "custom"
  out["seconds"] = time.time() - t0
  return out


# ----------------------------------------------------------------------------- reporting

def results_table(results: dict[str, dict]) -> str:
  """A markdown table, one row per model: perplexity, top-1 agreement, recall by length."""
  lens = sorted({L for r in results.values() for t in ("mqar", "passkey") for L in r[t]})
  head = (["model", "perplexity", "top-1 agr."] + [f"MQAR@{L}" for L in lens]
          + [f"passkey@{L}" for L in lens])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    agr = r.get("top1_agreement")
    cells = [name, f"{r['perplexity']:.2f}", "-" if agr is None else f"{agr:.3f}"]
    cells += [f"{r['mqar'][L]:.2f}" if L in r["mqar"] else "-" for L in lens]
    cells += [f"{r['passkey'][L]:.2f}" if L in r["passkey"] else "-" for L in lens]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def plot_recall(results: dict[str, dict], path: str) -> str:
  """PNG of recall accuracy vs context length: MQAR (solid) and passkey (dashed), one
  colour per model. Returns `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (name, r) in enumerate(results.items()):
    c = f"C{i}"
    for task, ls in (("mqar", "-"), ("passkey", "--")):
      xs = sorted(r[task])
      ax.plot(xs, [r[task][x] for x in xs], ls, marker="o", color=c, label=f"{name} {task}")
  ax.set_xscale("log", base=2)
  lens = sorted({L for r in results.values() for t in ("mqar", "passkey") for L in r[t]})
  ax.set_xticks(lens, [str(L) for L in lens])
  ax.minorticks_off()
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("recall accuracy")
  ax.set_ylim(-0.05, 1.05)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("In-context recall vs context length")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
