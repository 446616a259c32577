"""Sequence-parallel wrappers (pass-through stage; LASP-2 lands next)."""
from __future__ import annotations


def _ops():
  import linjax.ops as ops
  if hasattr(ops, "gla"):
    return ops
  from linjax.ops import reference, softmax

  class _Fallback:
    gla = staticmethod(lambda *a, method=None, chunk_size=None, **kw: reference.gla(*a, **kw))
    delta_rule = staticmethod(
        lambda *a, method=None, chunk_size=None, **kw: reference.delta_rule(*a, **kw))
    attention = staticmethod(softmax.attention)
  return _Fallback


def gla(q, k, v, g=None, **kwargs):
  return _ops().gla(q, k, v, g, **kwargs)


def delta_rule(q, k, v, beta, g=None, **kwargs):
  return _ops().delta_rule(q, k, v, beta, g, **kwargs)


def attention(q, k, v, **kwargs):
  return _ops().attention(q, k, v, **kwargs)
