"""Rotary position embeddings, computed exactly like transformers (default, linear, llama3).

`inv_freq(config)` reproduces `transformers.modeling_rope_utils` in float32;
`apply_rotary(x, positions, inv_freq)` is HF's `apply_rotary_pos_emb` (rotate_half layout:
the two halves of the head dimension are the real and imaginary parts).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict | None = None,
             max_position_embeddings: int | None = None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] in float32, as transformers computes them."""
  exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  # pow in float64 rounded to float32 reproduces torch's float32 pow bit for bit
  freq = np.float32(1.0) / (np.float64(rope_theta) ** exps.astype(np.float64)).astype(np.float32)
  rtype = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
  if rtype == "default":
    return freq
  if rtype == "linear":
    return (freq / np.float32(rope_scaling["factor"])).astype(np.float32)
  if rtype == "llama3":
    factor = np.float32(rope_scaling["factor"])
    low = rope_scaling["low_freq_factor"]
    high = rope_scaling["high_freq_factor"]
    old = rope_scaling.get("original_max_position_embeddings", max_position_embeddings)
    low_wl, high_wl = old / low, old / high
    wavelen = (np.float32(2 * math.pi) / freq).astype(np.float32)
    f = np.where(wavelen > np.float32(low_wl), freq / factor, freq).astype(np.float32)
    smooth = ((np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * f / factor + smooth * f).astype(np.float32)
    medium = ~(wavelen < np.float32(high_wl)) & ~(wavelen > np.float32(low_wl))
    return np.where(medium, smoothed, f).astype(np.float32)
  raise ValueError(f"unsupported rope type {rtype!r}; supported: {SUPPORTED_ROPE_TYPES}")


def rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def cos_sin(positions, freqs, dtype):
  """cos, sin [B, T, D] for integer positions [B, T] (float32 math, cast to dtype like HF)."""
  ang = positions[..., None].astype(jnp.float32) * jnp.asarray(freqs, jnp.float32)
  emb = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x, positions, freqs):
  """x: [B, T, H, D]; positions: [B, T]. Returns x rotated, in x's dtype."""
  cos, sin = cos_sin(positions, freqs, x.dtype)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return x * cos + rotate_half(x) * sin
