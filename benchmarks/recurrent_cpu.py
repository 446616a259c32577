"""Tokens/s against sequence length: the recurrent transformer beside a softmax Llama and a GLA
Llama of the same size (CPU).

    python benchmarks/recurrent_cpu.py --out benchmarks/results/recurrent_cpu.md
    python benchmarks/recurrent_cpu.py --quick            # T = 512, 2048 only

Models (~3.2M parameters each, byte vocabulary 259, float32):
  softmax      Llama, 4 layers, hidden 256, FFN 768, 4 heads (2 kv), softmax attention
               (the CPU "auto" method: blocked flash-style jnp, O(T^2) work)
  gla          the same Llama with every mixer "gla" (chunkwise, O(T))
  recurrent    RecurrentTransformer, one block, hidden 512, FFN 1536, 8 heads (4 kv),
               window 64 (each step attends over 128 positions), O(T w)
Forward (full-sequence / training form, B = 1) and forward+backward (gradient of the mean
token cross-entropy wrt every weight), jit, median of a few runs after a warm-up; and the
decode step (one token with the cache / state after a prefill of T tokens). Tokens/s =
T / time. A row whose cost would run past a few minutes is skipped.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from linjax.layers.params import param_count  # noqa: E402
from linjax.models.llama import Llama, LlamaConfig  # noqa: E402
from linjax.models.recurrent_transformer import (RecurrentTransformer,  # noqa: E402
                                                 RecurrentTransformerConfig)
from _timing import emit, median_seconds  # noqa: E402

LLAMA = dict(vocab_size=259, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
             max_position_embeddings=1 << 15, rms_norm_eps=1e-5)
RT = dict(vocab_size=259, hidden_size=512, intermediate_size=1536, num_hidden_layers=1,
          num_attention_heads=8, num_key_value_heads=4, window=64)
# Largest T per (model, pass); beyond, the cell reads "skip".
LIMITS = {("softmax", "fwd+bwd"): 8192, ("recurrent", "decode-prefill"): 4096}


def build(name):
  if name == "recurrent":
    return RecurrentTransformer(RecurrentTransformerConfig(**RT), rngs=nnx.Rngs(0))
  mixers = "softmax" if name == "softmax" else "gla"
  return Llama(LlamaConfig(**LLAMA, mixers=mixers), rngs=nnx.Rngs(0))


def bench(name, T, reps, passes):
  m = build(name)
  gdef, st = nnx.split(m)
  toks = jax.random.randint(jax.random.key(T), (1, T + 1), 3, 259)
  x, y = toks[:, :-1], toks[:, 1:]
  out = {}

  @jax.jit
  def fwd(st, x):
    return nnx.merge(gdef, st)(x)[0]

  @jax.jit
  def fwd_bwd(st, x, y):
    def loss(st):
      logits = nnx.merge(gdef, st)(x)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jax.grad(loss)(st)

  if "fwd" in passes:
    out["fwd"] = median_seconds(fwd, (st, x), reps)
  if "fwd+bwd" in passes and T <= LIMITS.get((name, "fwd+bwd"), 1 << 30):
    out["fwd+bwd"] = median_seconds(fwd_bwd, (st, x, y), reps)
  if "decode" in passes:
    prefill_T = T if T <= LIMITS.get((name, "decode-prefill"), 1 << 30) else None
    if prefill_T is not None:
      @jax.jit
      def prefill(st, x, cache):
        return nnx.merge(gdef, st)(x, cache=cache)[1]

      @jax.jit
      def step(st, tok, cache):
        return nnx.merge(gdef, st)(tok, cache=cache)

      cache = m.init_cache(1, T + 8)
      cache = jax.block_until_ready(prefill(st, x, cache))
      tok = toks[:, -1:]
      jax.block_until_ready(step(st, tok, cache))
      ts = []
      for _ in range(max(reps, 5)):
        t0 = time.perf_counter()
        jax.block_until_ready(step(st, tok, cache))
        ts.append(time.perf_counter() - t0)
      out["decode"] = statistics.median(ts)
      out["state_bytes"] = sum(a.nbytes for a in jax.tree.leaves(cache))
  return param_count(m), out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=None)
  p.add_argument("--note", default="")
  a = p.parse_args(argv)
  lengths = [512, 2048] if a.quick else [512, 1024, 2048, 4096, 8192, 16384]
  names = ("softmax", "gla", "recurrent")
  passes = ("fwd", "fwd+bwd", "decode")
  t0, load0 = time.time(), os.getloadavg()
  res, params = {}, {}
  for T in lengths:
    for name in names:
      reps = 3 if T <= 4096 else 2
      params[name], res[(name, T)] = bench(name, T, reps, passes)
      r = res[(name, T)]
      print(f"T={T:6d} {name:10s} " + "  ".join(
          f"{k} {v * 1e3:.1f} ms" if k != "state_bytes" else f"state {v / 2**20:.2f} MiB"
          for k, v in r.items()), flush=True)
  load1 = os.getloadavg()
  lines = ["# Recurrent transformer vs softmax and GLA Llamas: tokens/s against T (CPU)\n",
           f"`python benchmarks/recurrent_cpu.py{' --quick' if a.quick else ''} --out ...` on "
           f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, float32, "
           f"B = 1, {time.strftime('%Y-%m-%d')}; load average {load0[0]:.1f} at the start, "
           f"{load1[0]:.1f} at the end. Parameters: "
           + ", ".join(f"{n} {params[n]:,}" for n in names)
           + f". Total {time.time() - t0:.0f} s. {a.note}".rstrip() + "\n"]
  for key, title in (("fwd", "forward (training form), tokens/s"),
                     ("fwd+bwd", "forward + backward, tokens/s"),
                     ("decode", "decode: ms per token after a prefill of T tokens")):
    lines.append(f"\n## {title}\n")
    lines.append("| T | " + " | ".join(names) + " |")
    lines.append("|---:|" + "---:|" * len(names))
    for T in lengths:
      cells = []
      for n in names:
        v = res[(n, T)].get(key)
        cells.append("skip" if v is None else (f"{v * 1e3:.2f}" if key == "decode"
                                               else f"{T / v:,.0f}"))
      lines.append(f"| {T} | " + " | ".join(cells) + " |")
    if key != "decode":
      lo, hi = lengths[0], lengths[-1]
      g = []
      for n in names:
        a_, b_ = res[(n, lo)].get(key), res[(n, hi)].get(key)
        if a_ and b_:
          g.append(f"{n} {b_ / a_:.1f}x")
      lines.append(f"\n- time growth {lo} -> {hi} tokens ({hi // lo}x more): " + ", ".join(g)
                   + " (linear cost: equal to the token ratio; quadratic: its square)")
  st = {n: res[(n, lengths[0])].get("state_bytes") for n in names}
  lines.append("\nDecode state after the prefill (MiB): " + ", ".join(
      f"{n} {st[n] / 2**20:.2f} at T = {lengths[0]}" for n in names if st[n]) + "; "
      + ", ".join(f"{n} {res[(n, lengths[-1])]['state_bytes'] / 2**20:.2f} at T = {lengths[-1]}"
                  for n in names if res[(n, lengths[-1])].get("state_bytes")) + ". The "
      "recurrent transformer's and GLA's states do not depend on T (the softmax KV cache "
      "does); the recurrent transformer's prefill with a cache is token by token, so its "
      f"decode row stops at T = {LIMITS[('recurrent', 'decode-prefill')]} (the step "
      "itself is the same program at any T).")
  text = "\n".join(lines) + "\n"
  emit(text, a.out)


if __name__ == "__main__":
  main()
