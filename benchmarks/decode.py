"""Per-token decode time and decode-state memory vs context length: the softmax teacher's KV
cache grows with the context, the linear students' state does not.

    python benchmarks/decode.py                       # SmolLM2-135M shapes, 512 / 2k / 8k
    python benchmarks/decode.py --contexts 512,2048 --steps 10 --out benchmarks/results/decode.md

Weights are random with SmolLM2-135M's configuration (30 layers, 9 / 3 heads, head dim 64):
decode cost does not depend on their values. The cache at context L is filled as if L tokens
had been seen (positions 0..L-1 written, ring slots holding the last window), so each
measured step is exactly the step at position L. One jitted step, timed `--steps` times
after warm-up; the median per token is reported, batch size 1, float32.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linjax.linearize import linearize
from linjax.models.llama import Llama, LlamaConfig

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
               rms_norm_eps=1e-5)

STUDENTS = [
    ("softmax teacher (KV cache)", None, {}),
    ("sliding window 64 + 4 sinks", "sliding_window", {}),
    ("LoLCATs sw (Hedgehog + window 64)", "lolcats", {"window": 64}),
    ("LoLCATs tk (block terrace 64)", "lolcats", {"window": 64, "variant": "tk"}),
    ("Liger (GLA + window 64)", "liger", {"window": 64}),
    ("Hedgehog linear", "linear", {"feature_map": "hedgehog"}),
    ("SUPRA", "supra", {}),
    ("GLA", "gla", {}),
    ("gated DeltaNet", "gated_deltanet", {}),
]


def fill_cache(cache, L):
  """Mark the cache as holding positions 0..L-1 (values stay as they are)."""
  def one(c):
    if not isinstance(c, dict) or "pos" not in c:
      return c
    c = dict(c)
    S = c["pos"].shape[1]
    if "seg" in c:  # softmax KV cache: slot = position (full) or a sinks + window ring
      if S >= L:
        pos = np.arange(S)
        seg = np.where(pos < L, 1, -1)
      else:  # ring: sinks then the last window positions
        sinks = S - 64 if S > 64 else 0
        pos = np.concatenate([np.arange(sinks), L - 64 + np.arange(64)])
        seg = np.ones(S)
      c["pos"] = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), c["pos"].shape)
      c["seg"] = jnp.broadcast_to(jnp.asarray(seg, jnp.int32), c["seg"].shape)
    else:  # ring of size S holding positions L-S..L-1 at slot p % S
      p = np.arange(max(L - S, 0), L)
      pos = np.full(S, -1)
      pos[p % S] = p
      c["pos"] = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), c["pos"].shape)
    return c
  return {"layers": [one(c) for c in cache["layers"]],
          "next_pos": jnp.full_like(cache["next_pos"], L)}


def state_bytes(cache) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"])))


def bench(model, L, steps):
  cache = fill_cache(model.init_cache(1, L + steps + 4, jnp.float32), L)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tok, cache):
    m = nnx.merge(graphdef, state)
    logits, cache = m(tok, cache=cache)
    return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), cache

  tok = jnp.zeros((1, 1), jnp.int32)
  tok, c = step(state, tok, cache)  # compile + warm-up
  jax.block_until_ready(tok)
  times = []
  c = cache
  for _ in range(steps):
    t = time.perf_counter()
    tok, c = step(state, tok, c)
    jax.block_until_ready(tok)
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3, state_bytes(cache)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--contexts", default="512,2048,8192")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--out", default=None, help="write the markdown table here too")
  args = p.parse_args(argv)
  contexts = [int(c) for c in args.contexts.split(",")]
  cfg = LlamaConfig(**dict(SMOLLM2, num_hidden_layers=args.layers))
  base = Llama(cfg, rngs=nnx.Rngs(0))
  rows = []
  for name, mixer, kw in STUDENTS:
    model = base if mixer is None else linearize(base, mixer, **kw)
    cells = []
    for L in contexts:
      ms, nbytes = bench(model, L, args.steps)
      cells.append((ms, nbytes))
      print(f"{name:<36} L={L:>6}: {ms:8.2f} ms/token, state {nbytes / 2**20:8.2f} MiB", flush=True)
    rows.append((name, cells))
  dev = jax.devices()[0]
  head = "| model | " + " | ".join(f"ms/token @ {L}" for L in contexts) + " | " + \
      " | ".join(f"state MiB @ {L}" for L in contexts) + " |"
  sep = "|---" * (1 + 2 * len(contexts)) + "|"
  lines = [head, sep]
  for name, cells in rows:
    lines.append(f"| {name} | " + " | ".join(f"{ms:.2f}" for ms, _ in cells) + " | " +
                 " | ".join(f"{b / 2**20:.2f}" for _, b in cells) + " |")
  meta = (f"Decode, batch 1, float32, SmolLM2-135M shapes ({args.layers} layers), median of "
          f"{args.steps} steps; {dev.platform} ({getattr(dev, 'device_kind', '')}), "
          f"{os.cpu_count()} CPU cores, {platform.machine()}.\n"
          f"Command: `python benchmarks/decode.py --contexts {args.contexts} --steps {args.steps}"
          f"{'' if args.layers == 30 else f' --layers {args.layers}'}`")
  table = "\n".join(lines)
  print("\n" + meta + "\n\n" + table)
  if args.out:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      f.write("# Decode cost vs context length\n\n" + meta + "\n\n" + table + "\n")


if __name__ == "__main__":
  main()
