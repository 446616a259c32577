"""Which layers to keep as softmax attention: the ones a linear mixer replaces worst.

    losses = step0_transfer_losses(teacher, tokens, "lolcats", window=64, num_sinks=4, ...)
    keep = worst_layers(losses, k)           # k layer indices, worst first
    student = linearize(teacher, "lolcats", layers=lambda i: i not in keep, ...)

`step0_transfer_losses` linearizes every layer of a copy of the teacher with the given mixer
as it is at initialisation, runs it teacher-forced in attention-transfer mode
(`linjax.layers.distill`, "mse": every layer sees the teacher's hidden states) on `tokens`
and returns, per layer, the mean squared error of the mixer's head outputs divided by the
mean square of the teacher's head outputs (a relative error, so layers with large and small
attention outputs compare fairly). For the linjax LoLCATs / Liger recipes, whose hybrid
starts equal to sliding window + sinks, this is exactly how much each layer loses to the
window, which stage 1 then has to win back. The trainer's `keep_softmax` config field runs
this before `linearize` (`linjax.train.config`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def step0_transfer_losses(teacher, tokens, mixer: str, *, batch_size: int = 4,
                          **mixer_kwargs) -> np.ndarray:
  """Relative attention-transfer error [L] of `mixer` at initialisation in every layer."""
  from linjax.linearize import linearize
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] == 0:
    raise ValueError(f"tokens must be [rows, T] with at least one row, got {tokens.shape}")
  student = linearize(teacher, mixer, **mixer_kwargs)
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (min(batch_size, B), T))

  @nnx.jit
  def per_layer(student, teacher, tok):
    pos = positions[: tok.shape[0]]
    xs = teacher.hidden_states(tok, positions=pos)["mixer_inputs"]
    err, ref = [], []
    for layer, x in zip(student.layers, xs):
      m = layer.self_attn
      ty, _ = m.teacher_heads(x, pos)
      sy, _ = m.heads(x, positions=pos)
      err.append(((sy.astype(jnp.float32) - ty) ** 2).mean())
      ref.append((ty ** 2).mean())
    return jnp.stack(err), jnp.stack(ref)

  err = np.zeros(student.config.num_hidden_layers)
  ref = np.zeros_like(err)
  for s in range(0, B, batch_size):
    e, r = per_layer(student, teacher, jnp.asarray(tokens[s:s + batch_size]))
    n = min(batch_size, B - s)
    err += np.asarray(jax.device_get(e), np.float64) * n
    ref += np.asarray(jax.device_get(r), np.float64) * n
  if not np.all(np.isfinite(err)):
    raise FloatingPointError(f"non-finite transfer error in layers {np.where(~np.isfinite(err))[0].tolist()}")
  return err / np.where(ref > 0, ref, 1.0)


def worst_layers(losses, k: int) -> list[int]:
  """The indices of the `k` largest losses, largest first (ties: the lower index first)."""
  losses = np.asarray(losses, np.float64)
  if not 0 <= k <= losses.size:
    raise ValueError(f"cannot keep {k} of {losses.size} layers as softmax")
  order = sorted(range(losses.size), key=lambda i: (-losses[i], i))
  return order[:k]
