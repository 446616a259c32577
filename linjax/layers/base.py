"""What every token mixer shares: the q/k/v/o projections, rotary, GQA repeat, the `method`
selector, and the decode ring of recent keys.

A mixer is built as `cls(config, layer_idx, *, rngs, **kwargs)` with a
`linjax.models.llama.LlamaConfig`; it keeps HF attribute names for the projections it shares
with softmax attention (`q_proj`, `k_proj`, `v_proj`, `o_proj`), so `linjax.linearize` copies
weights by name.

`method` (one field per mixer, saved in the checkpoint config with its kwargs) picks how the
full-sequence pass and the prefill run; every method computes the same function:

  auto        Pallas / fused kernels on GPU and TPU, the best jnp form on CPU
  pallas      `linjax.ops` method "pallas" (Pallas kernels; interpret mode on CPU)
  chunk       chunkwise jnp (`linjax.ops` "chunk"), blocked window attention
  assoc_scan  chunk states by `jax.lax.associative_scan`
  parallel    the quadratic masked form (attention weights exist)
  recurrent   token by token (the decode step scanned)

Decoding (one token) always uses the op's step function. Window attention inside hybrids
and sliding-window layers follows `attention_method(method)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linjax.layers import rotary as rotary_lib
from linjax.layers.mlp import dense
from linjax.ops import METHODS

NEG = -1e30


def check_method(method: str) -> str:
  if method not in METHODS:
    raise ValueError(f"mixer `method` must be one of {METHODS}, got {method!r}")
  return method


def attention_method(method: str) -> str:
  """The `linjax.ops.attention` method that goes with a mixer method."""
  return {"auto": "auto", "pallas": "auto", "chunk": "chunk", "assoc_scan": "chunk",
          "parallel": "parallel", "recurrent": "parallel"}[check_method(method)]


def head_dims(config):
  H = config.num_attention_heads
  Hkv = config.num_key_value_heads or H
  D = config.head_dim or config.hidden_size // H
  return config.hidden_size, H, Hkv, D


def repeat_kv(x, rep):
  return x if rep == 1 else jnp.repeat(x, rep, axis=2)


def rope_freqs(config) -> tuple:
  """The Llama's rotary inverse frequencies (default / linear / llama3 scaling) as a tuple."""
  return tuple(float(f) for f in rotary_lib.inv_freq(
      head_dims(config)[3], float(config.rope_theta), config.rope_scaling,
      config.max_position_embeddings))


def segment_masks(positions, segment_ids):
  """Causal (by position) & same-segment visibility [B, T, T]."""
  qp, kp = positions[:, :, None], positions[:, None, :]
  vis = kp <= qp
  if segment_ids is not None:
    vis &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return vis


def token_mask(x, segment_ids):
  """[B, T] bool: real tokens of a cached call (segment id 0 is padding)."""
  if segment_ids is None:
    return jnp.ones(x.shape[:2], bool)
  return segment_ids > 0


def _proj(proj, base: bool):
  """`proj`, or with `base` the projection without its LoRA adapter (the teacher's weights)."""
  return getattr(proj, "base", proj) if base else proj


class QKVO(nnx.Module):
  """q/k/v/o projections laid out like the Llama's softmax attention (HF names); with
  `config.qk_norm` (Qwen3) q and k are RMS-normalized per head (`q_norm`, `k_norm`, weights
  [head_dim]) before rotary, in every mixer that shares them."""

  def __init__(self, config, *, rngs, method="auto"):
    hidden, H, Hkv, D = head_dims(config)
    self.rope_freqs = rope_freqs(config)
    self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size = H, Hkv, D, hidden
    self.method = check_method(method)
    kw = dict(dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype, rngs=rngs,
              std=float(config.initializer_range))
    qkv_bias = bool(config.attention_bias or getattr(config, "qkv_bias", False))
    self.q_proj = dense(hidden, H * D, ("embed", "heads"), use_bias=qkv_bias, **kw)
    self.k_proj = dense(hidden, Hkv * D, ("embed", "kv_heads"), use_bias=qkv_bias, **kw)
    self.v_proj = dense(hidden, Hkv * D, ("embed", "kv_heads"), use_bias=qkv_bias, **kw)
    self.o_proj = dense(H * D, hidden, ("heads", "embed"), use_bias=bool(config.attention_bias),
                        **kw)
    if getattr(config, "qk_norm", False):
      from linjax.layers.norms import RMSNorm
      nkw = dict(eps=config.rms_norm_eps, dtype=config.jnp_dtype,
                 param_dtype=config.jnp_param_dtype)
      self.q_norm, self.k_norm = RMSNorm(D, **nkw), RMSNorm(D, **nkw)
    else:
      self.q_norm = self.k_norm = None

  @property
  def rep(self):
    return self.num_heads // self.num_kv_heads

  def project(self, x, *, base: bool = False):
    """q [B, T, H, D], k / v [B, T, Hkv, D] (q / k normalized, not rotated); `base=True`
    uses the projections' base weights (a LoRA adapter left out: the teacher's)."""
    B, T, _ = x.shape
    q = _proj(self.q_proj, base)(x).reshape(B, T, self.num_heads, self.head_dim)
    k = _proj(self.k_proj, base)(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = _proj(self.v_proj, base)(x).reshape(B, T, self.num_kv_heads, self.head_dim)
    q, k = self.norm_qk(q, k)
    return q, k, v

  def norm_qk(self, q, k):
    """q, k [B, T, heads, D] through q_norm / k_norm (Qwen3), unchanged without them."""
    if self.q_norm is None:
      return q, k
    return self.q_norm(q), self.k_norm(k)

  def rotate(self, x, positions):
    """Rotary (HF rotate_half layout) of x [B, T, H, D] at positions [B, T]."""
    return rotary_lib.apply_rotary(x, positions, jnp.asarray(self.rope_freqs, jnp.float32))

  def out(self, o, x, *, base: bool = False):
    B, T = o.shape[:2]
    return _proj(self.o_proj, base)(o.reshape(B, T, -1).astype(x.dtype))

  def heads(self, x, *, positions, segment_ids=None, cache=None):
    """Per-head outputs [B, T, H, V] f32 before o_proj, and the new cache (mixers define it)."""
    raise NotImplementedError

  def __call__(self, x, *, positions, segment_ids=None, cache=None):
    if getattr(self, "distill", None) and cache is None:
      return self._distill_call(x, positions, segment_ids), None
    o, cache = self.heads(x, positions=positions, segment_ids=segment_ids, cache=cache)
    return self.out(o, x), cache


# ---------------------------------------------------------------- the decode ring of keys

def cache_slots(positions, window=None, num_sinks=0):
  """Slot of each position [B, T]: slot = position for a full cache; with a window the cache is
  a ring of num_sinks + window slots (slot = pos for pos < num_sinks, else
  num_sinks + (pos - num_sinks) % window)."""
  if window is None:
    return positions
  ring = num_sinks + (positions - num_sinks) % window
  return jnp.where(positions < num_sinks, positions, ring)


def init_kv_cache(batch_size, size, num_kv_heads, head_dim, dtype=jnp.float32):
  """{"k", "v" [B, S, Hkv, D], "pos" [B, S] int32, "seg" [B, S] int32 (-1: empty slot)}."""
  shape = (batch_size, size, num_kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.zeros((batch_size, size), jnp.int32),
          "seg": jnp.full((batch_size, size), -1, jnp.int32)}


def _raise_if_full(overflow, size, max_pos):
  if overflow:
    raise ValueError(f"decode position {int(max_pos)} does not fit the KV cache of {size} "
                     f"slots: build the cache with init_cache(batch_size, max_len > "
                     f"{int(max_pos)})")


def write_kv_cache(cache, k, v, positions, segment_ids, window=None, num_sinks=0):
  """Scatter the new tokens' k, v into the cache. Padding (segment 0) and, with a window,
  tokens already out of the window of the newest token, are dropped (no duplicate slots).

  Raises (at run time, also under jit) when a real token's position does not fit a full
  cache: dropping it silently would give wrong logits.
  """
  size = cache["k"].shape[1]
  slots = cache_slots(positions, window, num_sinks)
  keep = segment_ids > 0
  if window is None:
    real_pos = jnp.where(keep, positions, -1)
    jax.debug.callback(_raise_if_full, jnp.any(real_pos >= size), size, jnp.max(real_pos))
  else:
    last = jnp.max(jnp.where(keep, positions, -1), axis=1, keepdims=True)
    keep &= (positions > last - window) | (positions < num_sinks)
  slots = jnp.where(keep, slots, size)  # out of range -> dropped
  upd = jax.vmap(lambda c, s, x: c.at[s].set(x, mode="drop"))
  return {
      "k": upd(cache["k"], slots, k.astype(cache["k"].dtype)),
      "v": upd(cache["v"], slots, v.astype(cache["v"].dtype)),
      "pos": upd(cache["pos"], slots, positions.astype(jnp.int32)),
      "seg": upd(cache["seg"], slots, segment_ids.astype(jnp.int32)),
  }


def cached_attention(q, k, v, cache, *, positions, segment_ids, window, num_sinks, method,
                     scale=None, window_kind="sliding"):
  """Attention of T new queries over (cache contents + the new tokens), as stats (o, lse, m):
  the cache part is the masked form over the cache's slots, the new part `method` over the
  new tokens alone (the blocked form: O(T * window)); the two key sets are disjoint (the
  cache is written after) and are merged by their log-sum-exps."""
  from linjax.ops import attention
  from linjax.ops.softmax import merge_attention
  kw = dict(causal=True, window=window, num_sinks=num_sinks, segment_ids=segment_ids,
            q_positions=positions, scale=scale, return_stats=True, window_kind=window_kind)

  def over_cache(q):
    return attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype),
                     kv_segment_ids=cache["seg"], kv_positions=cache["pos"],
                     method="parallel", **kw)

  def empty(q):   # a first prefill: nothing cached yet, skip the [T, S] pass over the slots
    B, T, H = q.shape[:3]
    return (jnp.zeros(q.shape[:3] + v.shape[-1:], jnp.float32),
            jnp.full((B, T, H), NEG, jnp.float32), jnp.full((B, T, H), NEG, jnp.float32))

  o1, l1, m1 = jax.lax.cond(jnp.any(cache["seg"] >= 0), over_cache, empty, q)
  o2, l2, m2 = attention(q, k, v, kv_positions=positions, method=method, **kw)
  o, lse = merge_attention([(o1, l1), (o2, l2)])
  return o, lse, (None if m2 is None else jnp.maximum(m1, m2))
