"""Training objectives, combinable with weights per stage (`stage.objective`):

  ce              next-token cross-entropy over the unmasked tokens
  kl              KL(teacher || student) of the next-token distributions at temperature
                  `kl_temperature` (times temperature^2, Hinton et al.), per unmasked token;
                  the teacher runs on the fly (frozen, no gradient)
  z_loss          mean squared log-partition log Z of the student's logits (PaLM / SUPRA)
  attention_mse   per-layer mixer-output MSE, teacher-forced (LoLCATs stage 1)
  attention_xent  per-layer attention-weight cross-entropy, teacher-forced (Hedgehog)
  hidden_mse      residual-stream MSE after every layer, student vs teacher

`make_objective(weights, ...)` returns `fn(student, distilled, teacher, batch) ->
(loss, metrics)`: `student` is the model in plain mode, `distilled` the same weights in
distill mode (only needed by the attention_* terms), `teacher` the frozen teacher (kl,
hidden_mse). Every term is also reported as a metric, with "tokens" (the unmasked count,
which weights gradient accumulation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

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


def make_objective(weights: dict, *, kl_temperature: float = 1.0, transfer_scale: float = 1.0):
  """See the module docstring. transfer_scale multiplies the attention_* terms (their raw
  values are small: LoLCATs trains on 1000x the MSE)."""
  w = check_weights(weights)
  from linjax.linearize.losses import attention_transfer, hidden_mse

  def fn(student, distilled, teacher, batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    metrics = {"tokens": mask.sum()}
    total = jnp.zeros((), jnp.float32)
    if any(k in w for k in ("ce", "kl", "z_loss")):
      logits = model_logits(student, batch)
      if "ce" in w:
        nll, _ = masked_token_ce(logits, batch["targets"], mask)
        metrics["ce"] = nll / n
        total += w["ce"] * metrics["ce"]
      if "kl" in w:
        t_logits = jax.lax.stop_gradient(model_logits(teacher, batch))
        metrics["kl"] = (token_kl(t_logits, logits, kl_temperature) * mask).sum() / n
        total += w["kl"] * metrics["kl"]
      if "z_loss" in w:
        logz = jax.nn.logsumexp(logits, -1)
        metrics["z_loss"] = (logz ** 2 * mask).sum() / n
        total += w["z_loss"] * metrics["z_loss"]
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
