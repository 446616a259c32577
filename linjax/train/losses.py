"""Loss registry: `config.loss.name` picks a function `fn(model, batch, rng) -> (loss, metrics)`.

  @register_loss("ce")
  def cross_entropy(model, batch, rng, **kwargs): ...

`loss` is a float32 scalar to minimise; `metrics` a dict of float32 scalars that the trainer
averages and logs. Extra `config.loss` fields (everything but `name`) are passed as keyword
arguments. Other modules register their own losses: `linjax.linearize.losses` (attention
transfer, written by the linearization recipes) is imported on the first lookup when it exists.
"""
from __future__ import annotations

import importlib
import importlib.util

import jax
import jax.numpy as jnp

_REGISTRY: dict[str, callable] = {}
_EXTERNAL = ("linjax.linearize.losses",)


def register_loss(name: str):
  def deco(fn):
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"loss {name!r} is already registered to {_REGISTRY[name].__name__}")
    _REGISTRY[name] = fn
    return fn
  return deco


def _import_external():
  for mod in _EXTERNAL:
    try:
      found = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
      found = False
    if found:
      importlib.import_module(mod)


def available_losses() -> list[str]:
  _import_external()
  return sorted(_REGISTRY)


def get_loss(name: str):
  if name not in _REGISTRY:
    _import_external()
  if name not in _REGISTRY:
    raise ValueError(f"unknown loss {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def model_logits(model, batch, **kwargs):
  """Logits [B, T, V] of a linjax causal LM on a packed batch (float32)."""
  out = model(batch["input_ids"], positions=batch["positions"],
              segment_ids=batch["segment_ids"], **kwargs)
  if isinstance(out, tuple):
    out = out[0]
  if isinstance(out, dict):
    out = out["logits"]
  return out.astype(jnp.float32)


def masked_token_ce(logits, targets, mask):
  """(sum of masked token cross-entropies, number of masked tokens), in float32."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum((logz - tgt) * mask), jnp.sum(mask)


@register_loss("ce")
def cross_entropy(model, batch, rng, z_loss: float = 0.0):
  """Next-token cross-entropy averaged over the unmasked tokens (+ optional z-loss)."""
  del rng
  logits = model_logits(model, batch)
  nll, n = masked_token_ce(logits, batch["targets"], batch["loss_mask"])
  ce = nll / jnp.maximum(n, 1.0)
  loss = ce
  metrics = {"ce": ce, "tokens": n}
  if z_loss:
    logz = jax.nn.logsumexp(logits, axis=-1)
    zl = jnp.sum(jnp.square(logz) * batch["loss_mask"]) / jnp.maximum(n, 1.0)
    loss = loss + z_loss * zl
    metrics["z_loss"] = zl
  return loss, metrics
