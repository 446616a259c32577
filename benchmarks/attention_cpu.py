"""Softmax attention on CPU: the masked (`parallel`) form vs the blocked (`chunk`) form of
`linjax.ops.attention`, full causal and a 64-token window, forward and forward + backward.
This is what `method="auto"` on CPU is chosen from.

    python benchmarks/attention_cpu.py [--ts 512,1024,2048,4096] [--md benchmarks/results/attention_cpu.md]

Shapes: B=1, 9 query heads, 3 kv heads (SmolLM2's GQA), head dim 64, float32. Median of 3
jitted calls after a warm-up, milliseconds.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp

from _timing import median_seconds


def bench(f, *a, n=3):
  """Median milliseconds of jit(f)(*a)."""
  return median_seconds(jax.jit(f), a, n) * 1e3


def main(argv=None):
  from linjax import ops
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--ts", default="512,1024,2048,4096")
  p.add_argument("--md", default=None)
  args = p.parse_args(argv)
  rows = []
  for T in map(int, args.ts.split(",")):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (1, T, 9, 64))
    k = jax.random.normal(ks[1], (1, T, 3, 64))
    v = jax.random.normal(ks[2], (1, T, 3, 64))
    cells = [str(T)]
    for win in (None, 64):
      for m in ("parallel", "chunk"):
        fwd = lambda q, k, v: ops.attention(q, k, v, window=win, method=m)
        fb = lambda q, k, v: jax.grad(lambda *a: fwd(*a).sum(), argnums=(0, 1, 2))(q, k, v)
        cells += [f"{bench(fwd, q, k, v):.1f}", f"{bench(fb, q, k, v):.1f}"]
    rows.append("| " + " | ".join(cells) + " |")
    print(rows[-1], flush=True)
  load = os.getloadavg()
  head = ("| T | full parallel fwd | full parallel fwd+bwd | full chunk fwd | full chunk fwd+bwd "
          "| w64 parallel fwd | w64 parallel fwd+bwd | w64 chunk fwd | w64 chunk fwd+bwd |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  text = (f"# Softmax attention on CPU: masked vs blocked\n\n"
          f"`python benchmarks/attention_cpu.py --ts {args.ts}` on {platform.machine()}, "
          f"{os.cpu_count()} CPU cores, jax {jax.__version__}; load average at the end "
          f"{load[0]:.1f}. B=1, 9 / 3 heads, D=64, float32, ms (median of 3).\n\n"
          + head + "\n" + "\n".join(rows) + "\n")
  print(text)
  if args.md:
    with open(args.md, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
