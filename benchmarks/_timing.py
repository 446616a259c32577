"""The one timing helper of the benchmark scripts (imported as `_timing`: each script runs
with benchmarks/ first on sys.path)."""
from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, args, reps: int = 3) -> float:
  """Median wall time of `fn(*args)` over `reps` runs after one compiling / warm-up call."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)
