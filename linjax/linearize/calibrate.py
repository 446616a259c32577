"""Calibrate a linearized model's output norms against its teacher, before any training.

    calibrate(student, teacher, tokens)     # tokens [B, T] of training text

For every layer whose mixer has a GroupNorm affine (`norm_scale` / `norm_bias`: SUPRA with
norm_affine=True), the affine is set to the least-squares fit, per head and channel, of the
teacher's attention output (before o_proj) from the mixer's normalised output, on the
teacher's own hidden states: scale_c = cov(n_c, t_c) / var(n_c), bias_c = mean(t_c) -
scale_c mean(n_c) over the tokens. The layer then starts where the teacher's output scale
is, instead of at unit variance per head. Returns {layer index: relative error of the fit}.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def calibrate(student, teacher, tokens) -> dict:
  tokens = jnp.asarray(tokens)
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  hs = teacher.hidden_states(tokens, positions=positions)
  report = {}
  for i, layer in enumerate(student.layers):
    m = layer.self_attn
    if getattr(m, "norm_scale", None) is None:
      continue
    x = hs["mixer_inputs"][i]
    ty, _ = m.teacher_heads(x, positions)
    scale, bias = m.norm_scale[...], m.norm_bias[...]
    m.norm_scale[...] = jnp.ones_like(scale)
    m.norm_bias[...] = jnp.zeros_like(bias)
    n, _ = m.heads(x, positions=positions)                 # the normalised output alone
    n = np.asarray(n, np.float64).reshape(-1, *n.shape[2:])   # [B*T, H, D]
    t = np.asarray(ty, np.float64).reshape(-1, *ty.shape[2:])
    nm, tm = n.mean(0), t.mean(0)
    var = ((n - nm) ** 2).mean(0)
    cov = ((n - nm) * (t - tm)).mean(0)
    s = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0)
    b = tm - s * nm
    m.norm_scale[...] = jnp.asarray(s, scale.dtype)
    m.norm_bias[...] = jnp.asarray(b, bias.dtype)
    fit = n * s + b
    report[i] = float(np.linalg.norm(fit - t) / max(np.linalg.norm(t), 1e-30))
  return report
