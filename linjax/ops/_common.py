"""Small helpers shared by the linear-recurrence ops: method choice, padding, matmuls."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

METHODS = ("auto", "recurrent", "parallel", "chunk", "assoc_scan", "pallas")
F32 = jnp.float32


def resolve_method(method: str, kernel_name: str) -> str:
  """`auto` -> `pallas` on GPU/TPU when `pallas_kernels.<kernel_name>` exists, else `chunk`."""
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
  if method != "auto":
    return method
  if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"):
    try:
      mod = importlib.import_module("pallas_kernels")
    except ImportError:
      return "chunk"
    if hasattr(mod, kernel_name):
      return "pallas"
  return "chunk"


def pallas_kernel(kernel_name: str):
  """The Pallas kernel `pallas_kernels.<kernel_name>`, imported lazily."""
  try:
    mod = importlib.import_module("pallas_kernels")
  except ImportError as e:  # pragma: no cover - the package ships with linjax
    raise NotImplementedError(f"method='pallas' needs the `pallas_kernels` package: {e}") from e
  fn = getattr(mod, kernel_name, None)
  if fn is None:
    raise NotImplementedError(
        f"method='pallas': `pallas_kernels.{kernel_name}` is not implemented yet; "
        "use method='chunk' (or 'auto').")
  return fn


def pad_time(x, multiple: int, axis: int = 1):
  """Zero-pad axis `axis` (time) at the end up to a multiple of `multiple`."""
  if x is None:
    return None
  T = x.shape[axis]
  extra = (-T) % multiple
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def dot(spec: str, a, b):
  """einsum with float32 accumulation; operands meet in their common dtype."""
  dt = jnp.promote_types(a.dtype, b.dtype)
  return jnp.einsum(spec, a.astype(dt), b.astype(dt), preferred_element_type=F32)


def masked_exp(x, mask):
  """exp(x) where `mask`, 0 elsewhere; the mask is applied before the exp, so positive
  entries outside the mask are never exponentiated (and give no NaN gradients)."""
  return jnp.exp(jnp.where(mask, x, -jnp.inf))
