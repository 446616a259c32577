"""Softmax attention: full, causal, sliding window, sinks, GQA, packed rows; one op, five methods.

Layout [B, T, H, D] like every op. GQA: k and v may have fewer heads than q (Hq % Hkv == 0).
Logits and the softmax are float32 whatever the input dtype.

Methods (`method=`, one of ATTENTION_METHODS):
  parallel  the masked [T, S] form: any mask, any positions, keys longer than queries (decode
            over a cache). Memory O(T S).
  chunk     blocked flash-style jnp (`softmax_blocked`): causal self-attention (S == T), time
            O(T * keys seen) (O(T W) for a window W), memory O(T C), custom backward.
  cudnn     `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16 / fp16, its
            `local_window_size` for windows): no sinks, no packed rows, default positions.
  pallas    Pallas flash kernels from `jax.experimental.pallas.ops` (`pallas_kernels.attention`):
            splash attention on TPU (causal / local masks, packed rows, GQA), the Triton flash
            kernel on GPU (full causal, packed rows); no sinks.
  auto      by the platform being compiled for (`jax.lax.platform_dependent`, so an export
            for another platform gets that platform's path): GPU cudnn where it applies, else
            pallas (full causal), else chunk; TPU pallas (no sinks) else chunk; CPU chunk
            (faster than the masked form from T = 512 on, full or windowed, forward and
            backward: benchmarks/results/attention_cpu.md).
            Calls that only the parallel form supports (S != T, an extra `mask`, separate kv
            segment ids) take it; stats and block windows take the jnp forms.

`return_stats=True` returns (o, lse, m): the log-sum-exp and the max of each query's visible
logits ([B, T, Hq] float32; m is None from cudnn / pallas), what `merge_attention` needs to
combine attention over disjoint key sets, and what LoLCATs' hybrid needs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from linjax.ops._common import PLATFORMS, per_platform
from linjax.ops._checks import check_rank, check_same
from linjax.ops.softmax_blocked import NEG, blocked_attention

ATTENTION_METHODS = ("auto", "parallel", "chunk", "cudnn", "pallas")


WINDOW_KINDS = ("sliding", "blocks")


def in_window(qp, kp, window, window_kind="sliding"):
  """Is key position kp inside the window of query position qp (broadcasting)?
  "sliding": qp - kp < window. "blocks" (LoLCATs' block terrace): the key's block of
  `window` positions is the query's or the one before it, kp // W >= qp // W - 1."""
  if window_kind == "sliding":
    return qp - kp < window
  if window_kind == "blocks":
    return kp // window >= qp // window - 1
  raise ValueError(f"`window_kind` must be one of {WINDOW_KINDS}, got {window_kind!r}")


def attention_mask(q_positions, kv_positions, *, causal=True, window=None, num_sinks=0,
                   q_segment_ids=None, kv_segment_ids=None, window_kind="sliding"):
  """Boolean visibility [B, T, S]: may query at q_positions see the key at kv_positions?

  window: a query sees the `window` most recent keys including itself (i - j < window; with
  window_kind="blocks", the keys of its own block of `window` positions and the one before);
  num_sinks: keys at positions < num_sinks stay visible outside the window (StreamingLLM).
  Segment ids: keys are visible only within the same segment; a kv segment id < 0 marks an
  empty cache slot that nobody sees.
  """
  qp = q_positions[:, :, None]
  kp = kv_positions[:, None, :]
  vis = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
  if causal:
    vis &= kp <= qp
  if window is not None:
    vis &= in_window(qp, kp, window, window_kind) | (kp < num_sinks)
  if kv_segment_ids is not None:
    vis &= kv_segment_ids[:, None, :] >= 0
    if q_segment_ids is not None:
      vis &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return vis


def _parallel(q, k, v, vis, scale):
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  rep = Hq // Hkv
  qg = q.reshape(B, T, Hkv, rep, D)
  s = jnp.einsum("bthrd,bshd->bhrts", qg, k, preferred_element_type=jnp.float32) * scale
  vis = vis[:, None, None]
  s = jnp.where(vis, s, NEG)
  seen = vis.any(-1)
  m = jnp.where(seen, s.max(-1), NEG)
  p = jnp.where(vis, jnp.exp(s - m[..., None]), 0.0)
  l = p.sum(-1)
  p = p / jnp.where(seen, l, 1.0)[..., None]
  o = jnp.einsum("bhrts,bshd->bthrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
  heads = lambda x: jnp.moveaxis(x, 3, 1).reshape(B, T, Hq)
  return o.reshape(B, T, Hq, v.shape[-1]), heads(lse), heads(m)


def _cudnn_ok(q, T, S, num_sinks, segment_ids, explicit_positions, mask, causal):
  return (q.dtype in (jnp.bfloat16, jnp.float16) and S == T and not num_sinks and causal
          and segment_ids is None and not explicit_positions and mask is None
          and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0)


def _cudnn(q, k, v, window, scale, return_stats):
  lws = None if window is None else (int(window) - 1, 0)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                     local_window_size=lws, implementation="cudnn",
                                     return_residual=return_stats)
  if not return_stats:
    return out.astype(jnp.float32), None, None
  o, lse = out
  return o.astype(jnp.float32), lse.astype(jnp.float32), None


def method_for_platform(platform, method, *, q, T, S, window, num_sinks, segment_ids,
                        explicit_positions, mask, causal, kv_segment_ids, return_stats=False,
                        window_kind="sliding"):
  """The attention method a call runs on `platform` ("cpu" | "gpu" | "tpu"), static.

  "auto" picks the platform's fast path where it applies (see the module docstring);
  explicit methods are checked (a ValueError names what they need). "cudnn" on a non-GPU
  platform and "pallas" where no Pallas kernel covers the call (GPU windows) run "chunk"
  there, so one program can be exported for every platform."""
  if method not in ATTENTION_METHODS:
    raise ValueError(f"attention `method` must be one of {ATTENTION_METHODS}, got {method!r}")
  self_attn = S == T and mask is None and kv_segment_ids is None and causal
  if method == "parallel":
    return method
  if not self_attn:
    if method != "auto":
      raise ValueError(f"attention method {method!r} needs causal self-attention (as many keys "
                       f"as queries, no extra `mask`, no separate `kv_segment_ids`); got T={T}, "
                       f"S={S}: use method='parallel'")
    return "parallel"
  fast_ok = window_kind == "sliding" and not return_stats
  cudnn_ok = fast_ok and _cudnn_ok(q, T, S, num_sinks, segment_ids, explicit_positions, mask,
                                   causal)
  from pallas_kernels import attention as pk
  pallas_ok = fast_ok and not pk.unsupported(q, window=window, num_sinks=num_sinks,
                                             platform="tpu" if platform == "cpu" else platform)
  if method == "cudnn":
    if not (fast_ok and _cudnn_ok(q, T, S, num_sinks, segment_ids, explicit_positions, mask,
                                  causal)):
      raise ValueError("attention method 'cudnn' needs bf16 / fp16 inputs, head dim <= 128, no "
                       "sinks, no segment_ids, default positions and no stats; use 'chunk' or "
                       "'auto'")
    return "cudnn" if platform == "gpu" else "chunk"
  if method == "pallas":
    why = (None if fast_ok else "no stats / block windows in the flash kernels") or \
        pk.unsupported(q, window=window, num_sinks=num_sinks, platform="tpu")
    if why:
      raise ValueError(f"attention method 'pallas': {why}; use 'chunk' or 'auto'")
    return "pallas" if pallas_ok else "chunk"
  if method == "chunk":
    return method
  if platform == "gpu":
    return "cudnn" if cudnn_ok else "pallas" if pallas_ok else "chunk"
  if platform == "tpu":
    return "pallas" if pallas_ok else "chunk"
  return "chunk"


def _run(method, platform, q, k, v, q_positions, kv_positions, segment_ids, kv_segment_ids,
         mask, *, causal, window, num_sinks, scale, block_size, return_stats, window_kind):
  """One method on one platform -> (o f32, lse or None, m or None)."""
  B, T = q.shape[:2]
  if method == "parallel":
    if segment_ids is not None and kv_segment_ids is None:
      kv_segment_ids = segment_ids
    vis = attention_mask(q_positions, kv_positions, causal=causal, window=window,
                         num_sinks=num_sinks, q_segment_ids=segment_ids,
                         kv_segment_ids=kv_segment_ids, window_kind=window_kind)
    if mask is not None:
      vis &= mask
    return _parallel(q, k, v, vis, scale)
  if method == "chunk":
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
    return blocked_attention(q, k, v, positions=q_positions, segment_ids=seg, window=window,
                             num_sinks=num_sinks, scale=scale, block_size=block_size,
                             window_kind=window_kind)
  if method == "cudnn":
    return _cudnn(q, k, v, window, scale, return_stats)
  from pallas_kernels import attention as pk
  o, lse = pk.flash_attention(q, k, v, segment_ids=segment_ids, window=window, scale=scale,
                              platform="tpu" if platform == "cpu" else platform,
                              interpret=platform == "cpu", return_lse=return_stats)
  return o, lse, None


def attention(q, k, v, *, causal=True, window=None, num_sinks=0, segment_ids=None,
              kv_segment_ids=None, q_positions=None, kv_positions=None, scale=None,
              mask=None, method="auto", block_size=64, return_stats=False,
              window_kind="sliding"):
  """Masked softmax attention.

  Args:
    q: [B, T, Hq, D]; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv] with Hq % Hkv == 0.
    causal / window / num_sinks: see `attention_mask`.
    segment_ids: [B, T] packed-document ids of the queries (and of the keys when
      kv_segment_ids is not given and S == T).
    q_positions / kv_positions: [B, T] / [B, S] absolute positions. Default: arange, with the
      queries aligned to the end of the keys (decode: T=1 query after S-1 cached keys).
    mask: optional extra boolean mask [B, T, S] (True = visible), and-ed with the rest.
    method: see the module docstring. block_size: block length of the `chunk` method.
    return_stats: also return (lse, m) [B, T, Hq] float32 of the visible logits.
    window_kind: "sliding" or "blocks" (LoLCATs' block terrace; parallel and chunk only).
  Returns:
    o: [B, T, Hq, Dv] in v's dtype (a query that sees no key gets zeros), or (o, lse, m).
  """
  check_rank("q", q, 4, "[B, T, Hq, D]")
  check_rank("k", k, 4, "[B, S, Hkv, D]")
  check_rank("v", v, 4, "[B, S, Hkv, Dv]")
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  check_same("k", k.shape[:2] + (D,), "v", (B, S, k.shape[-1]), what="[B, S, ., D] of k vs q")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must be [B, S, Hkv, Dv] with k's leading dims {k.shape[:3]}, got {v.shape}")
  if Hq % Hkv:
    raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
  if window is not None and int(window) < 1:
    raise ValueError(f"`window` must be None or >= 1, got {window}")
  if num_sinks < 0:
    raise ValueError(f"`num_sinks` must be >= 0, got {num_sinks}")
  scale = D ** -0.5 if scale is None else scale
  explicit = q_positions is not None or kv_positions is not None
  if window_kind not in WINDOW_KINDS:
    raise ValueError(f"`window_kind` must be one of {WINDOW_KINDS}, got {window_kind!r}")
  if window_kind != "sliding" and method in ("cudnn", "pallas"):
    raise ValueError(f"window_kind={window_kind!r} runs with method 'parallel' or 'chunk', "
                     f"not {method!r}")
  if segment_ids is not None and kv_segment_ids is None and S != T:
    raise ValueError("segment_ids without kv_segment_ids needs as many keys as queries")
  geom = dict(q=q, T=T, S=S, window=window, num_sinks=num_sinks, segment_ids=segment_ids,
              explicit_positions=explicit or window_kind != "sliding", mask=mask,
              causal=causal, kv_segment_ids=kv_segment_ids, return_stats=return_stats,
              window_kind=window_kind)
  per = {p: method_for_platform(p, method, **geom) for p in PLATFORMS}
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(T) + (S - T), (B, T))
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  kw = dict(causal=causal, window=window, num_sinks=num_sinks, scale=scale,
            block_size=block_size, return_stats=return_stats, window_kind=window_kind)
  args = (q, k, v, q_positions, kv_positions, segment_ids, kv_segment_ids, mask)
  with_m = all(m in ("parallel", "chunk") for m in per.values())

  def make(platform, m):
    def f(*a):
      o, lse, m_ = _run(m, platform, *a, **kw)
      if not return_stats:
        return o
      return (o, lse, m_) if with_m else (o, lse)
    return f

  out = per_platform(per, make, *args)
  if not return_stats:
    return out.astype(v.dtype)
  o, lse = out[0], out[1]
  return o.astype(v.dtype), lse, (out[2] if with_m else None)


def merge_attention(parts):
  """Combine attention over disjoint key sets: parts = [(o, lse), ...] with o [B, T, H, D]
  and lse [B, T, H] (as `attention(..., return_stats=True)` gives). Returns (o, lse)."""
  lses = jnp.stack([p[1] for p in parts])                     # [P, B, T, H]
  top = lses.max(0)
  w = jnp.exp(lses - top)
  tot = w.sum(0)
  o = sum(p[0].astype(jnp.float32) * (wi / tot)[..., None] for p, wi in zip(parts, w))
  return o, top + jnp.log(tot)
