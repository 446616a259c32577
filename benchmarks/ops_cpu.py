"""CPU timing of the linear-recurrence methods beside causal softmax attention.

    python benchmarks/ops_cpu.py                       # full table, T = 512 ... 16384
    python benchmarks/ops_cpu.py --quick               # a few small shapes (< 1 minute)
    python benchmarks/ops_cpu.py --out benchmarks/results/ops_cpu.md

Op: `linjax.ops.gla` with a per-head gate (retention / simple GLA / SUPRA decay), B=1, H=4,
K=V=64, float32, every method; `jax.nn.dot_product_attention(is_causal=True)` at the same
shapes. Forward and forward+backward (grad of a random projection of o wrt q, k, v, g), jit
compiled, median of a few runs after a warm-up. Shapes whose cost would run to minutes or
whose memory would not fit are skipped and marked in the table.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from linjax import ops  # noqa: E402
from _timing import median_seconds  # noqa: E402

METHODS = ("recurrent", "parallel", "chunk", "assoc_scan")
COLUMNS = ("softmax",) + METHODS
# Largest T run per (method, pass); beyond it the cell reads "skip" (minutes or > a few GB).
LIMITS = {
    ("softmax", "fwd"): 8192, ("softmax", "fwd+bwd"): 8192,      # T^2 H logits: 4 GB at 16k
    ("parallel", "fwd"): 4096, ("parallel", "fwd+bwd"): 4096,    # T^2 H decay matrices
    ("recurrent", "fwd"): 16384, ("recurrent", "fwd+bwd"): 8192,  # T x state residuals
}


def make_fn(method, passes, T, H, D, chunk_size):
  if method == "softmax":
    def f(q, k, v, g):
      return jax.nn.dot_product_attention(q, k, v, is_causal=True)
  else:
    def f(q, k, v, g):
      return ops.gla(q, k, v, g, method=method, chunk_size=chunk_size)[0]
  if passes == "fwd":
    return jax.jit(f)
  def loss(q, k, v, g, do):
    return (f(q, k, v, g) * do).sum()
  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  return jax.jit(grad)


def time_one(method, passes, T, H, D, chunk_size, reps):
  ks = jax.random.split(jax.random.PRNGKey(T), 5)
  q = jax.random.normal(ks[0], (1, T, H, D))
  k = jax.random.normal(ks[1], (1, T, H, D)) * D ** -0.5
  v = jax.random.normal(ks[2], (1, T, H, D))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (1, T, H)) + 4.0)
  args = (q, k, v, g) if passes == "fwd" else (q, k, v, g, jax.random.normal(ks[4], v.shape))
  return median_seconds(make_fn(method, passes, T, H, D, chunk_size), args, reps)


def run(lengths, columns, passes_list, H, D, chunk_size, reps_for, log):
  res = {}
  for passes in passes_list:
    for T in lengths:
      for m in columns:
        if T > LIMITS.get((m, passes), 1 << 30):
          res[(m, passes, T)] = None
          continue
        res[(m, passes, T)] = time_one(m, passes, T, H, D, chunk_size, reps_for(T))
        log(f"  {passes:8s} T={T:6d} {m:10s} {res[(m, passes, T)] * 1e3:10.2f} ms")
  return res


def fmt_ms(x):
  return "skip" if x is None else (f"{x * 1e3:.1f}" if x >= 0.01 else f"{x * 1e3:.2f}")


def ratio(a, b):
  return "-" if a is None or b is None else f"{a / b:.1f}x"


def report(res, lengths, columns, passes_list, H, D, chunk_size, note):
  out = []
  out.append(f"# linjax.ops CPU benchmark\n")
  out.append(f"`gla` with a per-head gate, B=1, H={H}, K=V={D}, float32, chunk_size={chunk_size}; "
             f"softmax = `jax.nn.dot_product_attention(is_causal=True)`. Milliseconds, median "
             f"after a jit warm-up. jax {jax.__version__}, {platform.machine()}, "
             f"{os.cpu_count()} CPU cores. {note}\n")
  for passes in passes_list:
    out.append(f"\n## {passes} (ms)\n")
    out.append("| T | " + " | ".join(columns) + " | recurrent / chunk | softmax / chunk |")
    out.append("|---:|" + "---:|" * (len(columns) + 2))
    for T in lengths:
      cells = [fmt_ms(res.get((m, passes, T))) for m in columns]
      c = res.get(("chunk", passes, T))
      out.append(f"| {T} | " + " | ".join(cells) + f" | {ratio(res.get(('recurrent', passes, T)), c)}"
                 f" | {ratio(res.get(('softmax', passes, T)), c)} |")
    lo, hi = min(lengths), max(lengths)
    lo = 1024 if 1024 in lengths else lo
    out.append("")
    growth = []
    for m in columns:
      a, b = res.get((m, passes, lo)), res.get((m, passes, hi))
      growth.append(f"{m} {ratio(b, a)}")
    out.append(f"- growth {lo} -> {hi} tokens ({hi // lo}x): " + ", ".join(growth))
    cross = None
    for T in lengths:
      s, c = res.get(("softmax", passes, T)), res.get(("chunk", passes, T))
      if s is not None and c is not None and c < s:
        cross = T
        break
    if cross is None:
      out.append("- chunk never beats softmax at the measured lengths")
    else:
      out.append(f"- chunkwise linear attention overtakes softmax at T = {cross} "
                 f"(first measured length where it is faster)")
  return "\n".join(out) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="a few small shapes, under a minute")
  p.add_argument("--out", default=None, help="write the markdown table here")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--chunk-size", type=int, default=64)
  p.add_argument("--note", default="", help="text added under the title (e.g. machine load)")
  a = p.parse_args(argv)
  columns = COLUMNS
  if a.quick:
    lengths = [512, 2048]
    columns = ("softmax", "recurrent", "chunk")
    reps_for = lambda T: 2
  else:
    lengths = [512, 1024, 2048, 4096, 8192, 16384]
    reps_for = lambda T: 3 if T <= 4096 else 2
  passes_list = ("fwd", "fwd+bwd")
  t0 = time.time()
  res = run(lengths, columns, passes_list, a.heads, a.dim, a.chunk_size, reps_for,
            lambda s: print(s, flush=True))
  note = a.note + f" Total run time {time.time() - t0:.0f} s."
  text = report(res, lengths, columns, passes_list, a.heads, a.dim, a.chunk_size, note.strip())
  print(text)
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      f.write(text)
  return res


if __name__ == "__main__":
  main()
