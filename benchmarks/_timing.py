"""Helpers shared by the benchmark scripts: timing and writing the report (imported as
`_timing`: each script runs with benchmarks/ first on sys.path)."""
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


def emit(text: str, out: str | None) -> None:
  """Print a report and, when `out` is given, write it there (folders created)."""
  import os
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text)
