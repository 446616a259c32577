"""Chunkwise (gated) delta rule in WY / UT form.

  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t,   o_t = scale q_t S_t

Per chunk (b = chunk-local cumsum of g, scalar per head; g = None means b = 0):
  L_ji = beta_j exp(b_j - b_i) k_j . k_i  (i < j, masked before the exp),  T = (I + L)^-1
  u = T diag(beta) v,   w = T diag(beta exp(b)) k                 (fp32, "WY prep", jnp)
  v_new = u - w h_c;    h_{c+1} = exp(b_last) h_c + (k exp(b_last - b))^T v_new
  o = scale (q exp(b)) h_c + scale [(q k^T) exp(b_i - b_j)]_{j<=i} v_new
so the sequential pass is gla.state_pass with `w` (it also writes v_new) and the output is
gla.output with v_new in place of v: the same Pallas kernels, GPU and TPU lowerings.

Forward: Pallas kernels (state pass + output); the triangular inverse is a batched
block inversion in jnp (fp32, `_common.inv_unit_lower`) before them.
BACKWARD: NOT a Pallas kernel yet. The custom_vjp recomputes the forward with the jnp chunk
math below (`_delta_jnp`, lax.scan over chunks) and differentiates that with jax.vjp. Correct
(tested against reference.py) but slower than a fused backward kernel would be.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common as cm
from pallas_kernels import gla as _gla

f32 = jnp.float32


def _wy(k, v, beta, g, C, H):
  """k [B,Tp,H*Kp], v [B,Tp,H*Vp], beta [B,Tp,H], g None|[B,Tp,H] raw -> per-chunk f32 parts.

  Returns kc [B,NT,H,C,Kp], w, u [B,NT,H,C,*], b [B,NT,H,C] (chunk-local cumsum).
  """
  B, Tp, HK = k.shape
  NT = Tp // C
  kc = k.astype(f32).reshape(B, NT, C, H, -1).transpose(0, 1, 3, 2, 4)
  vc = v.astype(f32).reshape(B, NT, C, H, -1).transpose(0, 1, 3, 2, 4)
  bc = beta.astype(f32).reshape(B, NT, C, H).transpose(0, 1, 3, 2)
  if g is None:
    b = jnp.zeros_like(bc)
  else:
    b = jnp.cumsum(g.astype(f32).reshape(B, NT, C, H).transpose(0, 1, 3, 2), axis=-1)
  strict = jnp.tril(jnp.ones((C, C), bool), -1)
  kk = jnp.einsum("bnhia,bnhja->bnhij", kc, kc)
  decay = jnp.exp(jnp.where(strict, b[..., :, None] - b[..., None, :], -jnp.inf))
  Lm = bc[..., :, None] * kk * decay
  T = cm.inv_unit_lower(Lm)
  u = T @ (bc[..., None] * vc)
  w = T @ ((bc * jnp.exp(b))[..., None] * kc)
  return kc, w, u, b


def _to_layout(x):
  """[B, NT, H, C, D] -> [B, Tp, H*D]."""
  B, NT, H, C, D = x.shape
  return x.transpose(0, 1, 3, 2, 4).reshape(B, NT * C, H * D)


def _delta_jnp(q, k, v, beta, g, h0, *, C, H, scale):
  """The chunk math in plain jnp (used for the backward). Same layout as the kernels."""
  B, Tp, HK = q.shape
  NT = Tp // C
  kc, w, u, b = _wy(k, v, beta, g, C, H)
  qc = q.astype(f32).reshape(B, NT, C, H, -1).transpose(0, 1, 3, 2, 4)
  causal = jnp.tril(jnp.ones((C, C), bool))

  def step(h, xs):
    qn, kn, wn, un, bn = xs                                    # [B,H,C,*]
    vnew = un - wn @ h
    blast = bn[..., -1:]
    d = jnp.exp(jnp.where(causal, bn[..., :, None] - bn[..., None, :], -jnp.inf))
    a = (qn @ jnp.swapaxes(kn, -1, -2)) * d
    o = ((qn * jnp.exp(bn)[..., None]) @ h + a @ vnew) * scale
    kd = kn * jnp.exp(blast - bn)[..., None]
    h = h * jnp.exp(blast)[..., None] + jnp.swapaxes(kd, -1, -2) @ vnew
    return h, o

  mv = lambda x: jnp.moveaxis(x, 1, 0)
  hT, o = lax.scan(step, h0.astype(f32), (mv(qc), mv(kc), mv(w), mv(u), mv(b)))
  return _to_layout(jnp.moveaxis(o, 0, 1)).astype(v.dtype), hT


@functools.lru_cache(maxsize=None)
def _make_core(gated, C, H, scale, backend, interpret):
  kw = dict(C=C, H=H, scale=scale, backend=backend, interpret=interpret)
  kind = "scalar" if gated else "none"

  def run(q, k, v, beta, g, h0):
    dt = q.dtype
    _, w, u, _ = _wy(k, v, beta, g, C, H)
    gates = _gla.gate_arrays(g, kind, C, H) if gated else ()
    hs, hT, vnew = _gla.state_pass(k, _to_layout(u).astype(dt), gates, h0, reverse=False,
                                   kind=kind, w=_to_layout(w).astype(dt), **kw)
    o = _gla.output(q, k, vnew, gates, hs, kind=kind, **kw)
    return o, hT

  def fwd(q, k, v, beta, g, h0):
    return run(q, k, v, beta, g, h0), (q, k, v, beta, g, h0)

  def bwd(res, cts):
    # jnp recompute + autodiff (see module docstring): no Pallas backward kernel yet.
    q, k, v, beta, g, h0 = res
    do, dhT = cts
    f = functools.partial(_delta_jnp, C=C, H=H, scale=scale)
    _, vjp = jax.vjp(f, q, k, v, beta, g, h0)
    return vjp((do.astype(v.dtype), dhT.astype(f32)))

  @jax.custom_vjp
  def core(q, k, v, beta, g, h0):
    return run(q, k, v, beta, g, h0)

  core.defvjp(fwd, bwd)
  return core


def delta_rule_chunk_impl(q, k, v, beta, g, *, scale, initial_state, output_final_state,
                          cu_seqlens, chunk_size, interpret, backend):
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = float(K ** -0.5 if scale is None else scale)
  C = int(chunk_size)
  if C < 16 or C & (C - 1):
    raise ValueError(f"chunk_size must be a power of two >= 16, got {C}")
  if g is not None and g.ndim != 3:
    raise ValueError(f"delta rule gate g must be [B, T, H] (one decay per head), got {g.shape}")
  if cu_seqlens is not None:
    if B != 1:
      raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got B={B}")
    L, (qu, ku, vu, bu, gu) = cm.varlen_unpack(cu_seqlens, T, q, k, v, beta, g)
    o, S = delta_rule_chunk_impl(qu, ku, vu, bu, gu, scale=scale, initial_state=initial_state,
                                 output_final_state=True, cu_seqlens=None, chunk_size=C,
                                 interpret=interpret, backend=backend)
    return cm.varlen_repack(cu_seqlens, T, o), (S if output_final_state else None)
  Kp, Vp = cm.padded_dim(K, backend), cm.padded_dim(V, backend)
  Tp = -(-max(T, 1) // C) * C
  ql, kl = cm.to_kernel_layout(q, Tp, Kp), cm.to_kernel_layout(k, Tp, Kp)
  vl = cm.to_kernel_layout(v.astype(q.dtype), Tp, Vp)
  bl = cm.pad_axis(beta.astype(f32), 1, Tp)
  gl = None if g is None else cm.pad_axis(g.astype(f32), 1, Tp)
  if initial_state is None:
    h0 = jnp.zeros((B, H, Kp, Vp), f32)
  else:
    h0 = cm.pad_axis(cm.pad_axis(initial_state.astype(f32), 2, Kp), 3, Vp)
  core = _make_core(g is not None, C, H, scale, backend, interpret)
  o, S = core(ql, kl, vl, bl, gl, h0)
  o = cm.from_kernel_layout(o, T, H, V).astype(v.dtype)
  return o, (S[:, :, :K, :V] if output_final_state else None)
