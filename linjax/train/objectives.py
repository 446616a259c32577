"""Training objectives, combinable with weights per stage (`stage.objective`):

  ce              next-token cross-entropy over the unmasked tokens
  kl              KL(teacher || student) of the next-token distributions at temperature
                  `kl_temperature` (times temperature^2, Hinton et al.), per unmasked token;
                  the teacher runs on the fly (frozen, no gradient), or, with the stage's
                  `kl_top_k` > 0, its top-k log-probabilities come in the batch from a cache
                  on disk (`linjax.train.teacher_cache`: the top-k + "rest" bucket KL)
  z_loss          mean squared log-partition log Z of the student's logits (PaLM / SUPRA)
  attention_mse   per-layer mixer-output MSE, teacher-forced (LoLCATs stage 1)
  attention_xent  per-layer attention-weight cross-entropy, teacher-forced (Hedgehog)
  hidden_mse      residual-stream MSE after every layer, student vs teacher

`loss_chunk` (a stage field; 0 = off): the LM head and the ce / kl / z_loss terms run over
that many positions at a time under `jax.checkpoint`, from the models' `final_hidden`, so a
step never holds the [B, T, vocab] logits (nor the teacher's): at T = 16k and SmolLM2's
49,152-token vocabulary they are 3 GiB a row in float32, more than the 30 layers'
activations. The same sums as the whole-sequence form (float reassociation aside); the
backward recomputes each chunk's logits (the LM head's forward twice: measured +43% step
time for the head alone at 16 x 1024 tokens on CPU), so rows no longer than the chunk take
the whole-sequence path.

`make_objective(weights, ...)` returns `fn(student, distilled, teacher, batch) ->
(loss, metrics)`: `student` is the model in plain mode, `distilled` the same weights in
distill mode (only needed by the attention_* terms), `teacher` the frozen teacher (kl,
hidden_mse). Every term is also reported as a metric, with "tokens" (the unmasked count,
which weights gradient accumulation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from linjax.train.teacher_cache import KEYS as TOPK_KEYS
from linjax.train.teacher_cache import topk_kl

OBJECTIVES = ("ce", "kl", "z_loss", "attention_mse", "attention_xent", "hidden_mse")
TRANSFER = {"attention_mse": "mse", "attention_xent": "xent"}
NEEDS_TEACHER = ("kl", "hidden_mse")


def model_logits(model, batch):
  """Logits [B, T, V] float32 of a linjax causal LM on a packed batch."""
  out = model(batch["input_ids"], positions=batch.get("positions"),
              segment_ids=batch.get("segment_ids"))
  return (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)


def masked_token_ce(logits, targets, mask):
  """(sum of masked token cross-entropies, number of masked tokens), in float32."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum((logz - tgt) * mask), jnp.sum(mask)


def token_kl(teacher_logits, student_logits, temperature=1.0):
  """KL(teacher || student) per position [B, T] at `temperature` (times temperature^2)."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  return (jnp.exp(t) * (t - s)).sum(-1) * temperature ** 2


def _term_sums(logits, t_logits, targets, mask, terms, temperature):
  """Sums over the unmasked positions of the logit terms in `terms` (ce, kl, z_loss) of
  student `logits` (and, for kl, the teacher's logits `t_logits` or a dict of its cached
  top-k arrays, `teacher_cache.KEYS`), any [..., vocab] shape. {term: sum}."""
  out = {}
  if "ce" in terms:
    out["ce"] = masked_token_ce(logits, targets, mask)[0]
  if "kl" in terms:
    kl = (topk_kl(t_logits, logits, temperature) if isinstance(t_logits, dict)
          else token_kl(t_logits, logits, temperature))
    out["kl"] = (kl * mask).sum()
  if "z_loss" in terms:
    out["z_loss"] = (jax.nn.logsumexp(logits, -1) ** 2 * mask).sum()
  return out


def split_positions(x, chunk: int):
  """[B, T, ...] -> [n, B, chunk, ...], n = ceil(T / chunk), zero-padded at the end."""
  B, T = x.shape[:2]
  n = -(-T // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)


def _logit_sums(student, teacher, batch, terms, temperature, chunk):
  """Sums over unmasked tokens of the logit terms (ce, kl, z_loss) with the LM head applied to
  `chunk` positions at a time (the teacher: a model, or None when kl reads the cached top-k
  arrays of `batch`). Returns {term: sum}."""
  for name, m in (("student", student), ("teacher", teacher)):
    if m is not None and not (hasattr(m, "final_hidden") and hasattr(m, "head")):
      raise ValueError(f"loss_chunk > 0 needs a model with final_hidden() and head() (linjax "
                       f"Llama); the {name} is a {type(m).__name__}")
  kw = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  h = student.final_hidden(batch["input_ids"], **kw)
  cached = "kl" in terms and teacher is None
  ht = (jax.lax.stop_gradient(teacher.final_hidden(batch["input_ids"], **kw))
        if "kl" in terms and not cached else None)
  split = lambda x: split_positions(x, chunk)
  xs = {"h": split(h), "targets": split(batch["targets"]),
        "mask": split(batch["loss_mask"].astype(jnp.float32))}
  if ht is not None:
    xs["ht"] = split(ht)
  if cached:
    xs["topk"] = {k: split(batch[k]) for k in TOPK_KEYS}

  @jax.checkpoint
  def one(c):
    t_logits = (c["topk"] if cached else jax.lax.stop_gradient(teacher.head(c["ht"]))
                if "kl" in terms else None)
    return _term_sums(student.head(c["h"]), t_logits, c["targets"], c["mask"], terms,
                      temperature)

  def body(acc, c):
    return jax.tree.map(jnp.add, acc, one(c)), None

  zero = {k: jnp.zeros((), jnp.float32) for k in ("ce", "kl", "z_loss") if k in terms}
  return jax.lax.scan(body, zero, xs)[0]


def check_weights(weights: dict) -> dict:
  bad = sorted(set(weights) - set(OBJECTIVES))
  if bad:
    raise ValueError(f"unknown objective(s) {bad}; one of {OBJECTIVES}")
  used = {k: float(v) for k, v in weights.items() if float(v) != 0.0}
  if not used:
    raise ValueError(f"the objective has no term with a non-zero weight: {dict(weights)}")
  if sum(k in TRANSFER for k in used) > 1:
    raise ValueError("attention_mse and attention_xent cannot share a stage")
  return used


def make_objective(weights: dict, *, kl_temperature: float = 1.0, transfer_scale: float = 1.0,
                   loss_chunk: int = 0):
  """See the module docstring. transfer_scale multiplies the attention_* terms (their raw
  values are small: LoLCATs trains on 1000x the MSE); loss_chunk > 0 runs the LM head and
  the logit terms over that many positions at a time."""
  w = check_weights(weights)
  if int(loss_chunk) < 0:
    raise ValueError(f"loss_chunk must be >= 0 (0: the whole sequence), got {loss_chunk}")
  loss_chunk = int(loss_chunk)
  from linjax.linearize.losses import attention_transfer, hidden_mse

  def fn(student, distilled, teacher, batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    metrics = {"tokens": mask.sum()}
    total = jnp.zeros((), jnp.float32)
    logit_terms = [k for k in ("ce", "kl", "z_loss") if k in w]
    cached = "kl" in w and TOPK_KEYS[0] in batch
    if "kl" in w and not cached and teacher is None:
      raise ValueError("the kl objective needs a teacher, or the teacher's cached top-k "
                       f"arrays {TOPK_KEYS} in the batch (stage field kl_top_k)")
    if logit_terms and 0 < loss_chunk < batch["input_ids"].shape[1]:
      sums = _logit_sums(student, teacher if "kl" in w and not cached else None, batch,
                         logit_terms, kl_temperature, loss_chunk)
    elif logit_terms:
      t_logits = ({k: batch[k] for k in TOPK_KEYS} if cached else
                  jax.lax.stop_gradient(model_logits(teacher, batch)) if "kl" in w else None)
      sums = _term_sums(model_logits(student, batch), t_logits, batch["targets"], mask,
                        logit_terms, kl_temperature)
    for k in logit_terms:
      metrics[k] = sums[k] / n
      total += w[k] * metrics[k]
    for k in TRANSFER:
      if k in w:
        per_layer = attention_transfer(distilled, batch)
        metrics[k] = per_layer.mean()
        metrics[k + "_max"] = per_layer.max()
        total += w[k] * transfer_scale * metrics[k]
    if "hidden_mse" in w:
      metrics["hidden_mse"] = hidden_mse(student, teacher, batch)
      total += w["hidden_mse"] * metrics["hidden_mse"]
    return total, metrics

  fn.weights = w
  fn.needs_teacher = any(k in w for k in NEEDS_TEACHER)
  fn.distill_kind = next((TRANSFER[k] for k in w if k in TRANSFER), None)
  fn.needs_plain = any(k in w for k in ("ce", "kl", "z_loss", "hidden_mse"))
  return fn
