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


def step_inputs(op, q, k, v, *per_head):
  """A decode step's q, k [B, H, K] and v [B, H, V], checked; a single-token time axis
  ([B, 1, H, .]) is taken off them and off `per_head` (None stays None).
  Returns (timed, q, k, v, *per_head)."""
  timed = getattr(q, "ndim", 0) == 4
  if timed:
    if q.shape[1] != 1:
      raise ValueError(f"`q` for {op} must be [B, H, K] or [B, 1, H, K], got {q.shape}")
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    per_head = tuple(None if x is None else x[:, 0] for x in per_head)
  check_rank("q", q, 3, "[B, H, K]")
  B, H, _ = q.shape
  if getattr(k, "shape", None) != q.shape:
    raise ValueError(f"`k` must have shape [B, H, K] = {q.shape}, got {getattr(k, 'shape', None)}")
  check_rank("v", v, 3, "[B, H, V]")
  if v.shape[:2] != (B, H):
    raise ValueError(f"`v` must have shape [B, H, V] = ({B}, {H}, V), got {v.shape}")
  return (timed, q, k, v, *per_head)


def step_state(state, shape, expected="[B, H, K, V]"):
  """A decode step's float32 state: zeros when None, else checked against `shape`."""
  import jax.numpy as jnp
  if state is None:
    return jnp.zeros(shape, jnp.float32)
  if getattr(state, "shape", None) != tuple(shape):
    raise ValueError(f"`state` must have shape {expected} = {tuple(shape)}, got "
                     f"{getattr(state, 'shape', None)}")
  return state.astype(jnp.float32)


# ----------------------------------------------------------------------------- values
# Value checks of the recurrence inputs. Concrete arrays (eager calls) are checked at once
# and raise a ValueError naming the argument, the offending value, its index and what was
# expected. Traced arrays (inside jit / grad / a mixer) cannot be read at trace time: they
# are trusted, unless value checks of traced inputs are switched on (`traced_value_checks()`
# or LINJAX_CHECK_TRACED=1 before the trace), which adds a `jax.debug.callback` per check
# that raises at run time (slow: a host round trip per call; for debugging).

import contextlib
import os

_TRACED = [os.environ.get("LINJAX_CHECK_TRACED", "") not in ("", "0")]


@contextlib.contextmanager
def traced_value_checks(enabled: bool = True):
  """Check the values of traced inputs too (functions traced inside the block)."""
  old = _TRACED[0]
  _TRACED[0] = bool(enabled)
  try:
    yield
  finally:
    _TRACED[0] = old


def concrete(x):
  """x as numpy when it is known now (not a tracer), else None."""
  import jax
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  try:
    import numpy as np
    return np.asarray(x)
  except Exception:  # noqa: BLE001 - any other abstract value
    return None


def _first_bad(bad):
  import numpy as np
  idx = tuple(int(i) for i in np.argwhere(bad)[0])
  return idx, int(bad.sum())


def _run_check(x, check_np):
  """check_np(numpy array) raises; run it now, or at run time for traced x when enabled."""
  xc = concrete(x)
  if xc is not None:
    check_np(xc)
  elif _TRACED[0]:
    import jax
    jax.debug.callback(lambda a: check_np(__import__("numpy").asarray(a)), x)


def check_beta(beta, name="beta", upper=2.0):
  """beta in [0, upper] and finite (DeltaNet: sigmoid(.) in (0, 1), x 2 with negative
  eigenvalues allowed; 0 = no write, what padding tokens get). See the module note above
  for traced beta."""
  def f(b):
    import numpy as np
    b = b.astype(np.float64)
    bad = ~((b >= 0) & (b <= upper))
    if bad.any():
      idx, n = _first_bad(bad)
      raise ValueError(f"`{name}` must be in [0, {upper:g}] (the delta rule's write strength; "
                       f"eigenvalues of I - beta k k^T stay in [-1, 1]), got {float(b[idx])} at "
                       f"index {idx} ({n} value(s) outside)")
  _run_check(beta, f)


def check_log_gates(g, name="g"):
  """Log decays g <= 0 (the state is multiplied by exp(g) <= 1) and not NaN; -inf (a full
  reset) is allowed. See the module note above for traced g."""
  def f(a):
    import numpy as np
    a = a.astype(np.float64)
    bad = ~(a <= 0)
    if bad.any():
      idx, n = _first_bad(bad)
      raise ValueError(f"`{name}` holds log decays and must be <= 0 (a decay exp(g) <= 1; use "
                       f"e.g. -softplus(x) or logsigmoid(x)), got {float(a[idx])} at index {idx} "
                       f"({n} value(s) > 0 or NaN)")
  _run_check(g, f)


def check_cu_seqlens_values(cu_seqlens, T: int, name="cu_seqlens"):
  """Offsets start at 0, never decrease and end at most at T (concrete: at once; traced:
  with traced value checks on)."""
  def f(cu):
    import numpy as np
    cu = cu.astype(np.int64).reshape(-1)
    if cu.size and cu[0] != 0:
      raise ValueError(f"`{name}` must start at 0, got {cu.tolist()}")
    d = np.diff(cu)
    if (d < 0).any():
      i = int(np.argmax(d < 0))
      raise ValueError(f"`{name}` must be non-decreasing, got {cu[i]} then {cu[i + 1]} at "
                       f"index {i + 1}: {cu.tolist()}")
    if cu.size and cu[-1] > T:
      raise ValueError(f"`{name}` must end at most at T={T} (the packed length), got "
                       f"{int(cu[-1])}: {cu.tolist()}")
  _run_check(cu_seqlens, f)
