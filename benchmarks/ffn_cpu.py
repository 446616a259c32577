"""CPU timing of one SwiGLU FFN: dense vs low-rank vs block-structured (structured_mlp).

    python benchmarks/ffn_cpu.py --out benchmarks/results/ffn_cpu.md      # both widths
    python benchmarks/ffn_cpu.py --quick                                   # SmolLM2 width only

Widths: SmolLM2-135M (hidden 576 -> intermediate 1536, 4096 tokens) and Llama-3 8B
(4096 -> 14336, 512 tokens). Variants (Wei et al. 2024): dense; lowrank at rank 1/2, 1/4,
1/8 of min(hidden, intermediate); block (BlockShuffle) with 2, 4, 8 blocks (the same
parameter counts as those ranks); blockdense with rank 1/4 and 4 blocks. float32, the
activations [tokens, hidden], forward (y) and forward+backward (gradients of a random
projection of y wrt the weights and x), jit compiled, median of `reps` runs after a warm-up.
Speed-up = dense time / variant time at the same width and pass.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from linjax.layers import structured_mlp as sm  # noqa: E402
from linjax.models.llama import LlamaConfig  # noqa: E402
from _timing import emit, median_seconds  # noqa: E402

WIDTHS = {"SmolLM2-135M": (576, 1536, 4096), "Llama-3-8B": (4096, 14336, 512)}


def variants(h, m):
  full = min(h, m)
  out = [("dense", {})]
  out += [(f"lowrank r={full // d} (1/{d})", dict(mlp="lowrank", mlp_rank=full // d))
          for d in (2, 4, 8)]
  out += [(f"block nb={nb}", dict(mlp="block", mlp_blocks=nb)) for nb in (2, 4, 8)]
  out += [(f"blockdense r={full // 4} nb=4", dict(mlp="blockdense", mlp_rank=full // 4,
                                                  mlp_blocks=4))]
  return out


def build(h, m, kw, dtype):
  """The FFN with normal(0.02) weights: built abstractly (the SVD / orthogonal inits of the
  structured factors would cost minutes at 8B width and do not change the timing)."""
  cfg = LlamaConfig(vocab_size=8, hidden_size=h, intermediate_size=m, num_hidden_layers=1,
                    num_attention_heads=1, head_dim=8, dtype=dtype, param_dtype=dtype, **kw)
  mlp = nnx.eval_shape(lambda: sm.build_mlp(cfg, 0, rngs=nnx.Rngs(0)))
  gdef, state = nnx.split(mlp)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  vals = [(0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
          for k, x in zip(keys, leaves)]
  return nnx.merge(gdef, jax.tree.unflatten(tree, vals))


def bench(h, m, n, kw, reps, dtype="float32"):
  mlp = build(h, m, kw, dtype)
  gdef, params = nnx.split(mlp)
  x = jax.random.normal(jax.random.key(1), (n, h), jnp.float32).astype(dtype)
  dy = jax.random.normal(jax.random.key(2), (n, h), jnp.float32).astype(dtype)

  @jax.jit
  def fwd(params, x):
    return nnx.merge(gdef, params)(x)

  @jax.jit
  def fwd_bwd(params, x, dy):
    return jax.grad(lambda p, x: (nnx.merge(gdef, p)(x) * dy).sum(), argnums=(0, 1))(params, x)

  n_params = sum(a.size for a in jax.tree.leaves(params))
  t_f = median_seconds(fwd, (params, x), reps)
  t_b = median_seconds(fwd_bwd, (params, x, dy), reps)
  return n_params, t_f, t_b


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--out", default=None)
  p.add_argument("--note", default="")
  p.add_argument("--dtype", default="float32", help="params and activations (bfloat16 on GPU)")
  a = p.parse_args(argv)
  widths = {"SmolLM2-135M": WIDTHS["SmolLM2-135M"]} if a.quick else WIDTHS
  t0 = time.time()
  load0 = os.getloadavg()
  rows = []
  for name, (h, m, n) in widths.items():
    base = None
    for label, kw in variants(h, m):
      reps = a.reps if h < 2048 else max(2, a.reps // 2)
      n_params, t_f, t_b = bench(h, m, n, kw, reps, a.dtype)
      if base is None:
        base = (n_params, t_f, t_b)
      rows.append((name, h, m, n, label, n_params, n_params / base[0], t_f, t_b,
                   base[1] / t_f, base[2] / t_b))
      print(f"{name} {label:28s} params {n_params:>11,d} ({n_params / base[0]:5.1%})  "
            f"fwd {t_f * 1e3:9.1f} ms ({base[1] / t_f:4.2f}x)  fwd+bwd {t_b * 1e3:9.1f} ms "
            f"({base[2] / t_b:4.2f}x)", flush=True)
  load1 = os.getloadavg()
  out = ["# FFN CPU benchmark: dense vs structured (one SwiGLU FFN)\n",
         f"`python benchmarks/ffn_cpu.py{' --quick' if a.quick else ''} --out ...` on "
         f"{platform.machine()}, {os.cpu_count()} CPU cores ({_cpu_name()}), jax "
         f"{jax.__version__} on {jax.devices()[0].platform}, {a.dtype}, "
         f"{time.strftime('%Y-%m-%d')}; load average "
         f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end. Forward and "
         f"forward+backward of `down(silu(gate(x)) * up(x))` on [tokens, hidden] activations, jit, median of {a.reps} runs "
         f"({max(2, a.reps // 2)} at 8B width) after a warm-up. Speed-up = dense / variant at "
         f"the same width. Total {time.time() - t0:.0f} s. {a.note}".strip() + "\n"]
  for name in widths:
    h, m, n = widths[name]
    out.append(f"\n## {name}: {h} -> {m}, {n} tokens\n")
    out.append("| FFN | params | of dense | fwd ms | fwd speed-up | fwd+bwd ms | "
               "fwd+bwd speed-up |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
      if r[0] != name:
        continue
      out.append(f"| {r[4]} | {r[5]:,} | {r[6]:.1%} | {r[7] * 1e3:.1f} | {r[9]:.2f}x | "
                 f"{r[8] * 1e3:.1f} | {r[10]:.2f}x |")
  out.append("\n## GPU (bf16)\n\nPending: no GPU was lent to the session that wrote this "
             "table. The paper's 2.6x FFN speed-up at 32% of the parameters is a GPU number "
             "(bf16, large token counts); on a GPU the same script gives it: "
             "`JAX_PLATFORMS=cuda python benchmarks/ffn_cpu.py --dtype bfloat16 --out ...`.")
  text = "\n".join(out) + "\n"
  emit(text, a.out)


def _cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


if __name__ == "__main__":
  main()
