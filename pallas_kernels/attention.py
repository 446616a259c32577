"""Flash attention kernels for softmax layers, in linjax's layout: thin adapters over the Pallas
kernels that ship with JAX (`jax.experimental.pallas.ops`), not a kernel of our own.

  TPU: splash attention (`pallas.ops.tpu.splash_attention`): causal or local (sliding
       window) masks, packed rows (segment ids), GQA through the MQA kernel per kv head.
  GPU: the Triton flash kernel (`pallas.ops.gpu.attention.mha`): full causal attention with
       segment ids; GQA by repeating k / v heads.

Both take q, k, v [B, T, H, D] (k, v with Hkv heads), causal self-attention only, and run in
Pallas' interpreter on CPU (`interpret=True`) for tests. Sinks are not supported (use the
`chunk` method of `linjax.ops.attention`); `unsupported(...)` says why a call cannot run here.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BLOCK = 128


def _platform():
  b = jax.default_backend()
  return "tpu" if b == "tpu" else "gpu" if b in ("gpu", "cuda", "rocm") else "cpu"


def unsupported(q, *, window=None, num_sinks=0, explicit_positions=False, platform=None):
  """None if `flash_attention` can run this call on `platform`, else the reason."""
  platform = platform or _platform()
  if num_sinks:
    return "attention sinks are not supported by the Pallas flash kernels"
  if platform == "gpu" and window is not None:
    return "the GPU Pallas flash kernel has no sliding window (cudnn or chunk have)"
  if q.shape[-1] > 256:
    return f"head dim {q.shape[-1]} > 256"
  del explicit_positions  # causal by index: positions must advance by one inside a segment
  return None


def _pad(x, Tp, fill=0):
  T = x.shape[1]
  if Tp == T:
    return x
  return jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)


def flash_attention(q, k, v, *, segment_ids=None, window=None, scale=None, platform=None,
                    interpret=False, return_lse=False):
  """Causal self-attention. Returns (o [B, T, Hq, Dv] float32, lse [B, T, Hq] or None).

  platform: "gpu" (the Triton kernel) or "tpu" (splash); default: the current backend's
  ("tpu" in the interpreter on a CPU). interpret=True runs the kernel in Pallas'
  interpreter. (`linjax.ops.attention` picks the kernel per lowering platform with
  `jax.lax.platform_dependent`, so an export for another platform gets that platform's.)
  """
  if platform is None:
    platform = _platform()
    if platform == "cpu":
      platform, interpret = "tpu", True
  why = unsupported(q, window=window, platform=platform)
  if why:
    raise ValueError(f"pallas_kernels.attention: {why}")
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  scale = D ** -0.5 if scale is None else scale
  Tp = -(-T // BLOCK) * BLOCK
  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  # padded tokens get their own segment id: no real query sees them
  segp = _pad(seg, Tp, fill=jnp.iinfo(jnp.int32).min)
  qp, kp, vp = _pad(q, Tp), _pad(k, Tp), _pad(v, Tp)
  if platform == "gpu":
    o, lse = _gpu(qp, kp, vp, segp, scale, bool(interpret), Hq // Hkv, return_lse)
  else:
    o, lse = _tpu(qp, kp, vp, segp, window, scale, bool(interpret), Hq // Hkv, return_lse)
  o = o[:, :T].astype(jnp.float32)
  lse = None if not return_lse else lse[:, :T].astype(jnp.float32)
  return o, lse


def _gpu(q, k, v, seg, scale, interpret, rep, return_lse):
  # (the kernel's own backward refuses return_residuals=True: lse is for forward-only use)
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  if rep > 1:
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  out = gpu_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, interpret=interpret,
                          return_residuals=return_lse)
  if not return_lse:
    return out, None
  o, lse2 = out                                      # the kernel keeps its lse in base 2
  return o, jnp.swapaxes(lse2, 1, 2) * math.log(2.0)  # [B, H, T] -> [B, T, H], natural log


def _splash_kernel(T, rep, window, interpret, residuals):
  # built per call (not cached): the kernel holds its mask info as arrays, and one made
  # inside a trace must not outlive it
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  one = (sm.CausalMask((T, T)) if window is None
         else sm.LocalMask((T, T), window_size=(int(window) - 1, 0), offset=0))
  mask = sm.MultiHeadMask([one] * rep)
  blocks = sk.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK,
                         block_q_dkv=BLOCK, block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK,
                         block_q_dq=BLOCK, block_kv_dq=BLOCK)
  return sk.make_splash_mqa_single_device(mask=mask, block_sizes=blocks, save_residuals=residuals,
                                          interpret=interpret)


def _tpu(q, k, v, seg, window, scale, interpret, rep, return_lse):
  # (splash's backward refuses save_residuals=True: lse is for forward-only use)
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  kernel = _splash_kernel(T, rep, None if window is None else int(window), interpret,
                          bool(return_lse))
  # [B, T, Hkv*rep, D] -> [B, Hkv, rep, T, D]; k, v -> [B, Hkv, T, D]
  qg = jnp.moveaxis((q * scale).astype(q.dtype).reshape(B, T, Hkv, rep, D), 1, 3)
  kg, vg = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)

  def one(qh, kh, vh, s):
    out = kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=s, kv=s))
    if return_lse:
      out, (lse,) = out
      return out, lse
    return out, jnp.zeros(out.shape[:-1], jnp.float32)

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
  o, lse = jax.vmap(per_head)(qg, kg, vg, seg)        # o [B, Hkv, rep, T, Dv], lse [B, Hkv, rep, T]
  o = jnp.moveaxis(o, 3, 1).reshape(B, T, Hq, -1)
  lse = jnp.moveaxis(lse, 3, 1).reshape(B, T, Hq) if return_lse else None
  return o, lse
