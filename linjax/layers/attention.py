"""Softmax self-attention (the Llama mixer) and its sliding-window + sinks variant.

Registered mixers:
  "softmax"         full causal attention; `window=` / `num_sinks=` kwargs optional.
  "sliding_window"  the same with window=64, num_sinks=4 by default (StreamingLLM-style
                    no-training baseline).

The math is split into methods so hybrids can reuse it: `project_qkv(x, positions)` gives
rotated q [B,T,H,D], k and v [B,T,Hkv,D]; `attend(q, k, v, ...)` runs the masked softmax;
`o_proj` maps back to hidden. Decode cache (per layer): a dict of
  k, v  [B, S, Hkv, D]   keys / values by slot
  pos   [B, S] int32     absolute position of each slot
  seg   [B, S] int32     segment id of each slot (-1: empty, nobody attends)
Slots are keyed by position: slot = pos for a full cache (S = max_len); with a window the
cache is a ring of size num_sinks + window (slot = pos for pos < num_sinks, else
num_sinks + (pos - num_sinks) % window), so decode memory is O(window). Padding tokens
(segment id 0) are never written.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linjax.layers import rotary
from linjax.layers.mixers import register_mixer
from linjax.layers.mlp import dense


def _attention_op():
  try:
    from linjax.parallel.sequence import attention as op  # sequence-parallel when a mesh is set
  except ImportError:
    from linjax.ops.softmax import attention as op
  return op


def cache_slots(positions, size, window=None, num_sinks=0):
  """Slot of each position [B, T] in a cache of `size` slots (see module docstring)."""
  if window is None:
    return positions
  ring = num_sinks + (positions - num_sinks) % window
  return jnp.where(positions < num_sinks, positions, ring)


def _raise_if_full(overflow, size, max_pos):
  if overflow:
    raise ValueError(f"decode position {int(max_pos)} does not fit the KV cache of {size} "
                     f"slots: build the cache with init_cache(batch_size, max_len > "
                     f"{int(max_pos)})")


def write_cache(cache, k, v, positions, segment_ids, window=None, num_sinks=0):
  """Scatter the new tokens' k, v into the cache. Padding (segment 0) and, with a window,
  tokens already out of the window of the newest token, are dropped (no duplicate slots).

  Raises (at run time, also under jit) when a real token's position does not fit a full
  cache: dropping it silently would give wrong logits.
  """
  size = cache["k"].shape[1]
  slots = cache_slots(positions, size, window, num_sinks)
  keep = segment_ids > 0
  if window is None:
    real_pos = jnp.where(keep, positions, -1)
    jax.debug.callback(_raise_if_full, jnp.any(real_pos >= size), size, jnp.max(real_pos))
  if window is not None:
    last = jnp.max(jnp.where(keep, positions, -1), axis=1, keepdims=True)
    keep &= (positions > last - window) | (positions < num_sinks)
  slots = jnp.where(keep, slots, size)  # out of range -> dropped

  def one(c, s, x):
    return c.at[s].set(x, mode="drop")

  upd = jax.vmap(one)
  return {
      "k": upd(cache["k"], slots, k.astype(cache["k"].dtype)),
      "v": upd(cache["v"], slots, v.astype(cache["v"].dtype)),
      "pos": upd(cache["pos"], slots, positions.astype(jnp.int32)),
      "seg": upd(cache["seg"], slots, segment_ids.astype(jnp.int32)),
  }


@register_mixer("softmax")
class LlamaAttention(nnx.Module):
  """Llama self-attention with rotary, GQA, optional sliding window and attention sinks."""

  default_window = None
  default_num_sinks = 0

  def __init__(self, config, layer_idx: int, *, rngs: nnx.Rngs, window=-1, num_sinks=-1):
    self.layer_idx = layer_idx
    self.num_heads = config.num_attention_heads
    self.num_kv_heads = config.num_key_value_heads
    self.head_dim = config.head_dim
    self.window = self.default_window if window == -1 else window
    self.num_sinks = self.default_num_sinks if num_sinks == -1 else int(num_sinks)
    self.rope_freqs = tuple(float(f) for f in rotary.inv_freq(
        config.head_dim, config.rope_theta, config.rope_scaling,
        config.max_position_embeddings))
    h = config.hidden_size
    kw = dict(use_bias=config.attention_bias, dtype=config.jnp_dtype,
              param_dtype=config.jnp_param_dtype, rngs=rngs, std=config.initializer_range)
    self.q_proj = dense(h, self.num_heads * self.head_dim, ("embed", "heads"), **kw)
    self.k_proj = dense(h, self.num_kv_heads * self.head_dim, ("embed", "kv_heads"), **kw)
    self.v_proj = dense(h, self.num_kv_heads * self.head_dim, ("embed", "kv_heads"), **kw)
    self.o_proj = dense(self.num_heads * self.head_dim, h, ("heads", "embed"), **kw)

  # -- pieces a subclass can reuse ------------------------------------------------------
  def project_qkv(self, x, positions, *, rotate=True):
    """q [B,T,H,D], k, v [B,T,Hkv,D]; rotary applied to q and k unless rotate=False."""
    B, T, _ = x.shape
    q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    if rotate:
      q, k = self.rotate(q, positions), self.rotate(k, positions)
    return q, k, v

  def rotate(self, x, positions):
    return rotary.apply_rotary(x, positions, jnp.asarray(self.rope_freqs, jnp.float32))

  def attend(self, q, k, v, *, q_positions, kv_positions, segment_ids=None,
             kv_segment_ids=None, window=-1, num_sinks=-1):
    """Masked causal softmax attention -> [B, T, H, D]."""
    window = self.window if window == -1 else window
    num_sinks = self.num_sinks if num_sinks == -1 else num_sinks
    return _attention_op()(q, k, v, causal=True, window=window, num_sinks=num_sinks,
                           segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                           q_positions=q_positions, kv_positions=kv_positions)

  def output(self, o):
    B, T = o.shape[:2]
    return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

  # -- mixer interface ------------------------------------------------------------------
  def __call__(self, x, *, positions, segment_ids=None, cache=None):
    q, k, v = self.project_qkv(x, positions)
    if cache is None:
      o = self.attend(q, k, v, q_positions=positions, kv_positions=positions,
                      segment_ids=segment_ids)  # keys share the queries' segment ids
      return self.output(o), None
    if segment_ids is None:
      segment_ids = jnp.ones(positions.shape, jnp.int32)
    if self.window is None:
      # Full cache (slot = position): write first, then attend over the cache alone; no
      # copy of the cache per step (the scatter is in place when the cache is donated).
      cache = write_cache(cache, k, v, positions, segment_ids)
      o = self.attend(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype),
                      q_positions=positions, kv_positions=cache["pos"],
                      segment_ids=segment_ids, kv_segment_ids=cache["seg"])
      return self.output(o), cache
    # Ring: attend over (cache, new tokens) before writing, so a prefill longer than the
    # ring (whose new tokens overwrite slots earlier queries still need) stays exact.
    kk = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)
    vv = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
    kpos = jnp.concatenate([cache["pos"], positions.astype(jnp.int32)], axis=1)
    kseg = jnp.concatenate([cache["seg"], segment_ids.astype(jnp.int32)], axis=1)
    o = self.attend(q, kk.astype(q.dtype), vv.astype(q.dtype), q_positions=positions,
                    kv_positions=kpos, segment_ids=segment_ids, kv_segment_ids=kseg)
    cache = write_cache(cache, k, v, positions, segment_ids, self.window, self.num_sinks)
    return self.output(o), cache

  def cache_size(self, max_len):
    if self.window is None:
      return max_len
    return min(max_len, self.num_sinks + self.window)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    S = self.cache_size(max_len)
    shape = (batch_size, S, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.zeros((batch_size, S), jnp.int32),
            "seg": jnp.full((batch_size, S), -1, jnp.int32)}


@register_mixer("sliding_window")
class SlidingWindowAttention(LlamaAttention):
  """Softmax attention over the last `window` tokens plus `num_sinks` first tokens."""

  default_window = 64
  default_num_sinks = 4
