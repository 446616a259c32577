"""Argument checks whose errors name the argument and the expected shape."""
from __future__ import annotations


def check_rank(name, x, rank, expected):
  if x is None or getattr(x, "ndim", None) != rank:
    got = None if x is None else getattr(x, "shape", type(x).__name__)
    raise ValueError(f"`{name}` must have shape {expected} (rank {rank}), got {got}")


def check_same(name_a, shape_a, name_b, shape_b, what=""):
  if tuple(shape_a) != tuple(shape_b):
    raise ValueError(f"`{name_a}` and `{name_b}` disagree{(' on ' + what) if what else ''}: "
                     f"{tuple(shape_a)} vs {tuple(shape_b)}")


def check_shape(name, x, shape, expected):
  """`shape` may hold None for free dims; `expected` is the human-readable form."""
  got = getattr(x, "shape", None)
  if got is None or len(got) != len(shape) or any(
      s is not None and s != g for s, g in zip(shape, got)):
    raise ValueError(f"`{name}` must have shape {expected} = "
                     f"{tuple('*' if s is None else s for s in shape)}, got {got}")
