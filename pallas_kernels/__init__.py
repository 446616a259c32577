"""Chunkwise Pallas kernels (forward and backward) for the gated linear family and the delta
rule. Depends only on jax. GPU lowering: Pallas Triton; TPU lowering: Pallas Mosaic; on CPU the
same kernels run in Pallas' interpreter (`interpret=True`, or automatically on a CPU backend).

Conventions (those of `linjax.ops`, see `linjax/ops/reference.py`): q, k [B,T,H,K]; v [B,T,H,V]; g None | [B,T,H] | [B,T,H,K] (log
forget gate <= 0); beta [B,T,H]; state [B,H,K,V] float32; o in the input dtype.
"""
from __future__ import annotations

import functools

from pallas_kernels import _common
from pallas_kernels.delta import delta_rule_chunk_impl
from pallas_kernels.gla import gla_chunk_impl

__all__ = ["gla_chunk", "delta_rule_chunk"]


def _dispatch(impl, interpret, *args, **kw):
  if interpret:
    return impl(*args, interpret=interpret, backend="gpu", **kw)
  return _common.on_platforms(
      functools.partial(impl, interpret=False, backend="tpu", **kw),
      functools.partial(impl, interpret=False, backend="gpu", **kw),
      functools.partial(impl, interpret="plain", backend="gpu", **kw),
      *args)


def gla_chunk(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, chunk_size=64, interpret=False, segment_ids=None, form="auto"):
  """Gated linear attention S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

  segment_ids [B, T] (packed rows): the state resets wherever the id changes.
  form: "auto" (by shape, see `pallas_kernels.tiling.use_fused`), "fused" or "two_pass".
  Returns (o [B,T,H,V] in v's dtype, final state [B|N,H,K,V] float32 or None).
  """
  return _dispatch(gla_chunk_impl, interpret, q, k, v, g, scale=scale,
                   initial_state=initial_state, output_final_state=output_final_state,
                   cu_seqlens=cu_seqlens, chunk_size=chunk_size, segment_ids=segment_ids,
                   form=form)


def delta_rule_chunk(q, k, v, beta, g=None, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, chunk_size=64, interpret=False,
                     segment_ids=None, form="auto"):
  """(Gated) delta rule S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t.

  segment_ids [B, T] (packed rows): the state resets wherever the id changes.
  form: as `gla_chunk`.
  Returns (o [B,T,H,V] in v's dtype, final state [B|N,H,K,V] float32 or None).
  """
  return _dispatch(delta_rule_chunk_impl, interpret, q, k, v, beta, g, scale=scale,
                   initial_state=initial_state, output_final_state=output_final_state,
                   cu_seqlens=cu_seqlens, chunk_size=chunk_size, segment_ids=segment_ids,
                   form=form)
