"""Small helpers shared by the linear-recurrence ops: method choice, padding, matmuls."""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

METHODS = ("auto", "recurrent", "parallel", "chunk", "assoc_scan", "pallas")
F32 = jnp.float32


PLATFORMS = ("cpu", "gpu", "tpu")


def current_platform() -> str:
  b = jax.default_backend()
  return "tpu" if b == "tpu" else "gpu" if b in ("gpu", "cuda", "rocm") else "cpu"


def per_platform(choice: dict, make, *args):
  """Run the method `choice[platform]` ({"cpu" | "gpu" | "tpu": static name}) of the platform
  the program is compiled for: `make(platform, method)` gives a function of `args`. One
  method everywhere is a plain call on this process's platform; otherwise every branch goes
  under `jax.lax.platform_dependent`, so a program traced on a CPU host and exported (or
  compiled ahead of time) for "cuda" / "tpu" carries that platform's fast path. The one
  dispatcher of every op's `method="auto"`; each op decides its own `choice`."""
  if len(set(choice.values())) == 1:
    p = current_platform()
    return make(p, choice[p])(*args)
  gpu = make("gpu", choice["gpu"])
  return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, tpu=make("tpu", choice["tpu"]),
                                    default=make("cpu", choice["cpu"]))


def by_method(method: str, kernel_name: str, arrays: dict, kernel_kw: dict, run):
  """The op's outputs (o float32, final state or None) by `method`.

  `run(method, arrays)` computes the jnp forms; the Pallas form is
  `pallas_kernels.<kernel_name>(**arrays, **kernel_kw)` (`kernel_kw` static, hashable).
  "auto" is the Pallas kernel on GPU / TPU and "chunk" on CPU, picked by the platform being
  compiled for (`per_platform`), so a program exported with `jax.export` for "cuda" or
  "tpu" from a CPU host carries the kernels. An explicit "pallas" runs the kernel
  everywhere (Pallas' interpreter on a CPU backend)."""
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
  if method == "auto":
    fast = "pallas" if hasattr(importlib.import_module("pallas_kernels"), kernel_name) else "chunk"
    choice = {"cpu": "chunk", "gpu": fast, "tpu": fast}
  else:
    choice = dict.fromkeys(PLATFORMS, method)

  def make(platform, m):
    if m == "pallas":
      return _kernel(kernel_name, platform == "cpu", **kernel_kw)
    return lambda a: run(m, a)
  return per_platform(choice, make, arrays)


@functools.lru_cache(maxsize=None)
def _kernel(kernel_name: str, interpret, **kw):
  """A jitted call of the kernel, one object per static configuration: layers of one shape
  reuse its trace (tracing a Pallas kernel with its backward costs ~0.6 s on a CPU host,
  paid in every layer of a model otherwise, on CPU too under "auto")."""
  fn = pallas_kernel(kernel_name)

  def call(arrays):
    o, S = fn(**arrays, **kw, interpret=interpret)
    return o.astype(F32), S
  return jax.jit(call)


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


# ------------------------------------------------------------------ packed segments

def check_segment_ids(segment_ids, B, T, cu_seqlens, method):
  """Validate `segment_ids` ([B, T] int); returns `method` (every method takes them)."""
  if segment_ids is None:
    return method
  if cu_seqlens is not None:
    raise ValueError("pass either `cu_seqlens` (B = 1 packing) or `segment_ids` ([B, T] "
                     "packing), not both")
  if getattr(segment_ids, "shape", None) != (B, T):
    raise ValueError(f"`segment_ids` must have shape [B, T] = {(B, T)}, got "
                     f"{getattr(segment_ids, 'shape', None)}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"`segment_ids` must be an integer array, got dtype {segment_ids.dtype}")
  return method


def segment_runs(segment_ids):
  """[B, T] run index: 0 for the first segment of a row, +1 wherever the id changes."""
  seg = jnp.asarray(segment_ids)
  new = seg[:, 1:] != seg[:, :-1]
  return jnp.concatenate([jnp.zeros(seg.shape[:1] + (1,), jnp.int32),
                          jnp.cumsum(new, axis=1, dtype=jnp.int32)], axis=1)


def chunk_segment_masks(runs, C):
  """Masks for the chunkwise forms of a packed row, runs [B, T] -> (each [B, 1, n, ...]):

    same    [.., C, C]  tokens i, j of a chunk are in the same segment
    carry   [.., C]     token i is in the segment the state entering its chunk belongs to
                        (chunk 0: the row's first segment, which `initial_state` feeds)
    last    [.., C]     token j is in the chunk's last segment (it reaches the state leaving it)
    through [..]        the chunk holds no boundary and continues the entering segment, so
                        the entering state decays through it
  """
  B, T = runs.shape
  runs = jnp.pad(runs, ((0, 0), (0, (-T) % C)), mode="edge")  # padding joins the last run
  rb = runs.reshape(B, 1, -1, C)
  enter = jnp.concatenate([rb[..., :1, 0], rb[..., :-1, -1]], axis=-1)   # [B, 1, n]
  return dict(same=rb[..., :, None] == rb[..., None, :], carry=rb == enter[..., None],
              last=rb == rb[..., -1:], through=rb[..., -1] == enter)
