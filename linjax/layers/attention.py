"""Softmax self-attention (the Llama mixer) and its sliding-window + sinks variant.

Registered mixers:
  "softmax"         full causal attention; `window=` / `num_sinks=` kwargs optional (the
                    default window is the config's: `sliding_window` on its sliding layers).
  "sliding_window"  the same with window=64, num_sinks=4 by default (StreamingLLM-style
                    no-training baseline).

`method` is a `linjax.ops.attention` method: "auto" (cuDNN / Pallas flash on GPU, splash on
TPU, the best jnp form on CPU), "cudnn", "pallas", "chunk" (blocked, O(T * window)),
"parallel" (masked T x T). Decode cache (per layer, `linjax.layers.base.init_kv_cache`):
  k, v  [B, S, Hkv, D]   keys / values by slot
  pos   [B, S] int32     absolute position of each slot
  seg   [B, S] int32     segment id of each slot (-1: empty, nobody attends)
Slots are keyed by position (`base.cache_slots`): slot = pos for a full cache (S = max_len);
with a window the cache is a ring of num_sinks + window slots, so decode memory is
O(window). A T-token prefill attends over the cache (masked, the cache is small or empty)
and over the new tokens (`method`), merged by log-sum-exp, then writes the cache; padding
tokens (segment id 0) are never written.
"""
from __future__ import annotations

import jax.numpy as jnp

from linjax.layers.base import (QKVO, cached_attention, init_kv_cache, token_mask,
                                write_kv_cache)
from linjax.layers.distill import teacher_output
from linjax.layers.mixers import register_mixer
from linjax.ops.softmax import ATTENTION_METHODS
from linjax.parallel import sequence as sp


@register_mixer("softmax")
class LlamaAttention(QKVO):
  """Llama self-attention with rotary, GQA, optional sliding window and attention sinks."""

  default_window = None
  default_num_sinks = 0
  # attention transfer (`linjax.linearize.set_distill`): a softmax layer beside the distilled
  # mixers is its own teacher, with its base weights and no gradient
  distill = None

  def __init__(self, config, layer_idx: int, *, rngs, window=-1, num_sinks=-1, method="auto"):
    if method not in ATTENTION_METHODS:
      raise ValueError(f"softmax attention `method` must be one of {ATTENTION_METHODS}, got "
                       f"{method!r}")
    super().__init__(config, rngs=rngs, method="auto")
    self.method = method
    if window == -1:   # the class default, else the teacher's (Mistral / Qwen sliding layers)
      window = self.default_window
      if window is None and hasattr(config, "layer_window"):
        window = config.layer_window(layer_idx)
    self.window = window
    self.num_sinks = self.default_num_sinks if num_sinks == -1 else int(num_sinks)
    if self.window is not None and int(self.window) < 1:
      raise ValueError(f"`window` must be None or >= 1, got {self.window}")
    if self.num_sinks < 0:
      raise ValueError(f"`num_sinks` must be >= 0, got {self.num_sinks}")

  def __call__(self, x, *, positions, segment_ids=None, cache=None):
    teacher = bool(self.distill) and cache is None
    q, k, v = self.project(x, base=teacher)
    q, k = self.rotate(q, positions), self.rotate(k, positions)
    if cache is None:
      o = sp.attention(q, k, v, causal=True, window=self.window, num_sinks=self.num_sinks,
                       segment_ids=segment_ids, q_positions=positions, kv_positions=positions,
                       method=self.method)
      if teacher:
        return teacher_output(self, o, x), None
      return self.out(o, x), None
    seg = token_mask(x, segment_ids).astype(jnp.int32)
    method = "auto" if self.method in ("cudnn", "pallas") else self.method
    o, _, _ = cached_attention(q, k, v, cache, positions=positions, segment_ids=seg,
                               window=self.window, num_sinks=self.num_sinks, method=method)
    cache = write_kv_cache(cache, k, v, positions, seg, self.window, self.num_sinks)
    return self.out(o.astype(q.dtype), x), cache

  def cache_size(self, max_len):
    if self.window is None:
      return max_len
    return min(max_len, self.num_sinks + self.window)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    return init_kv_cache(batch_size, self.cache_size(max_len), self.num_kv_heads, self.head_dim,
                         dtype)


@register_mixer("sliding_window")
class SlidingWindowAttention(LlamaAttention):
  """Softmax attention over the last `window` tokens plus `num_sinks` first tokens."""

  default_window = 64
  default_num_sinks = 4
