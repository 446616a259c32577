"""Which layers to keep as softmax attention: the ones a linear mixer replaces worst.

    losses = step0_transfer_losses(teacher, tokens, "lolcats", window=64, num_sinks=4, ...)
    keep = worst_layers(losses, k)           # k layer indices, worst first
    student = linearize(teacher, "lolcats", layers=lambda i: i not in keep, ...)

Two measures of "worst" (the trainer's `keep_softmax.criterion`):

  "transfer"  `step0_transfer_losses`: each layer's own relative attention-transfer error,
              every layer fed the teacher's hidden states (local: one forward);
  "kl"        `restore_one_gains`: how much the model's output moves back to the teacher's
              when that one layer is given back its softmax attention in the otherwise fully
              linearized model (KL(teacher || all linearized) - KL(teacher || all but layer i),
              per token; global: the errors of the later layers included). On SmolLM2-135M
              with sliding window 64 + 4 sinks the two pick different layers ([4, 6, 7, 8,
              10, 20] vs [17, 18, 20, 23, 24, 26]), and six layers of "kl" leave a far better
              untrained model (4,096 validation-split tokens, with [15, 17, 18, 20, 23, 24]:
              KL 0.088 / top-1 86.8% vs 0.215 / 82.4% for "transfer", 0.280 / 80.1% with
              none kept; held out, [17, 18, 20, 23, 24, 26]: 0.107 / 85.9% vs 0.225 /
              82.5%). Choosing greedily instead (each pick conditional on the layers already
              kept) picked the same first four layers (20, 23, 18, 17) on 2,048 training
              tokens, so the one-shot ranking is kept.

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


def restore_one_gains(teacher, tokens, mixer: str, *, layers=None, batch_size: int = 4,
                      **mixer_kwargs) -> np.ndarray:
  """Per layer i [L]: KL(teacher || S) - KL(teacher || S_i), mean per token over `tokens`,
  where S is `teacher` with the candidate `layers` (default all) linearized by `mixer` at
  initialisation and S_i is S with layer i softmax again (0 for layers not in `layers`).

  S's residual stream is computed once; S_i reuses it up to layer i, so all L gains cost
  about L / 2 forwards of S (one jitted call per layer and distinct layer structure)."""
  from linjax.linearize import layer_ids, linearize
  from linjax.train.objectives import token_kl
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] == 0:
    raise ValueError(f"tokens must be [rows, T] with at least one row, got {tokens.shape}")
  L = teacher.config.num_hidden_layers
  cand = layer_ids(layers, L)
  student = linearize(teacher, mixer, cand, **mixer_kwargs)
  B, T = tokens.shape

  @nnx.jit
  def layer_fwd(layer, x, pos):
    return layer(x, positions=pos)[0]

  @nnx.jit
  def kl_sum(model, x, t_logits):
    return token_kl(t_logits, model.head(x)).sum()

  @nnx.jit
  def embed_and_logits(model, tok, pos):
    return model.embed_tokens(tok), model(tok, positions=pos)[0]

  gain = np.zeros(L)
  for s in range(0, B, batch_size):
    tok = jnp.asarray(tokens[s:s + batch_size])
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tok.shape)
    x, t_logits = embed_and_logits(teacher, tok, pos)
    xs = [x]
    for layer in student.layers:
      xs.append(layer_fwd(layer, xs[-1], pos))
    base = float(kl_sum(student, xs[-1], t_logits))
    for i in cand:
      x = layer_fwd(teacher.layers[i], xs[i], pos)
      for layer in student.layers[i + 1:]:
        x = layer_fwd(layer, x, pos)
      gain[i] += base - float(kl_sum(student, x, t_logits))
  if not np.all(np.isfinite(gain)):
    raise FloatingPointError(f"non-finite KL gain in layers {np.where(~np.isfinite(gain))[0].tolist()}")
  return gain / tokens.size


def worst_layers(losses, k: int) -> list[int]:
  """The indices of the `k` largest losses, largest first (ties: the lower index first)."""
  losses = np.asarray(losses, np.float64)
  if not 0 <= k <= losses.size:
    raise ValueError(f"cannot keep {k} of {losses.size} layers as softmax")
  order = sorted(range(losses.size), key=lambda i: (-losses[i], i))
  return order[:k]
