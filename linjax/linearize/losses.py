"""Distillation losses registered into the trainer's registry (`config.loss.name`).

  attention_transfer  (kind="mse" | "xent", loss_scale=1000)   LoLCATs stage 1 / Hedgehog:
      per-layer loss between the softmax teacher and the linear student of every linearized
      layer, on teacher-forced hidden states; train with `trainable = FeatureMapParam`.
  hedgehog            attention_transfer with kind="xent" (attention-weight cross-entropy).

Both put the model's linear mixers in distill mode for the call and restore the
previous settings afterwards, so the model's structure is unchanged between steps.
"""
from __future__ import annotations

from linjax.linearize import linear_mixers
from linjax.linearize.recipes import transfer_losses
from linjax.train.losses import register_loss


def _transfer(model, batch, kind, loss_scale):
  mixers = [m for m in linear_mixers(model) if hasattr(m, "distill")]
  saved = [m.distill for m in mixers]
  try:
    for m in mixers:
      m.distill = kind
    losses = transfer_losses(model, batch["input_ids"], batch.get("positions"),
                             batch.get("segment_ids"))
  finally:
    for m, d in zip(mixers, saved):
      m.distill = d
  mean = losses.mean()
  return loss_scale * mean, {"transfer_loss": mean, "transfer_loss_max": losses.max()}


@register_loss("attention_transfer")
def attention_transfer(model, batch, rng, kind: str = "mse", loss_scale: float = 1000.0):
  del rng
  return _transfer(model, batch, kind, loss_scale)


@register_loss("hedgehog")
def hedgehog(model, batch, rng, loss_scale: float = 1.0):
  del rng
  return _transfer(model, batch, "xent", loss_scale)
