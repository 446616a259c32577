"""Chunkwise kernel speed on one accelerator: linjax Pallas vs linjax jnp chunk vs cuDNN flash
attention vs flash-linear-attention (fla, torch/Triton), in one process.

  python benchmarks/kernels.py                       # B=2 H=16 D=128 bf16, T = 2k..32k
  python benchmarks/kernels.py --ts 2048,16384 --ops simple_gla,gla --md out.md

Prints one row per (op, T, pass): median ms of each implementation, the ratio linjax/fla
(< 1 means linjax is faster), and for linjax the achieved TFLOP/s and GB/s under the model of
`model_cost` (chunk C = 64, per head and token; D = K = V):
  FLOP fwd      4 K V + 2 C (K + V)   (state update, inter-chunk output, intra-chunk scores
                and their product); delta rule + 2 K V (w h) + 2 C (2 K + V) (the WY form)
  bytes fwd     fused: q, k, v read, o written, the gate (bf16 tensors, fp32 gate);
                two-pass: + the chunk states written and read (bf16, 2 K V / C per token);
                delta rule: + w, u written and read (fp32)
  fwd+bwd       3x the forward FLOP; bytes: the forward plus the backward's recomputed fp32
                chunk states and their gradients (written, read) and q, k, v, do, dq, dk, dv
Attention rows use 2 B H T^2 D (causal fwd) and 3.5x that for fwd+bwd.
`benchmarks/gpu_run.py` is the one-call device run (correctness, targets, this table).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels as pk  # noqa: E402

OPS = ["linear", "simple_gla", "gla", "delta_rule"]


def time_jax(fn, *args, reps=5, inner=5):
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(inner):
      out = f(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t) / inner)
  return float(np.median(ts)) * 1e3


def make_inputs(op, B, T, H, D, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (B, T, H, D), bf)
  k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(bf)
  v = jax.random.normal(ks[2], (B, T, H, D), bf)
  g = beta = None
  if op == "simple_gla":
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 4.0)
  elif op == "gla":
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, D)) + 4.0)
  elif op == "delta_rule":
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
  return q, k, v, g, beta


def linjax_fns(op, impl, C=64, form="auto", interpret=False):
  """(fwd, fwd+bwd) closures over q, k, v, g, beta for the Pallas kernels (form: "auto",
  "fused", "two_pass") or the jnp chunk."""
  if impl == "pallas":
    kw = dict(chunk_size=C, form=form, interpret=interpret)
    if op == "delta_rule":
      call = lambda q, k, v, g, beta: pk.delta_rule_chunk(q, k, v, beta, None, **kw)[0]
    else:
      call = lambda q, k, v, g, beta: pk.gla_chunk(q, k, v, g, **kw)[0]
  else:
    import linjax.ops as lops  # may not exist yet
    if op == "delta_rule":
      call = lambda q, k, v, g, beta: lops.delta_rule(q, k, v, beta, method="chunk")[0]
    else:
      call = lambda q, k, v, g, beta: lops.gla(q, k, v, g, method="chunk")[0]

  def fwdbwd(q, k, v, g, beta):
    def loss(q, k, v, g, beta):
      return call(q, k, v, g, beta).astype(jnp.float32).sum()
    argn = (0, 1, 2) + ((3,) if g is not None else ()) + ((4,) if beta is not None else ())
    return jax.value_and_grad(loss, argn)(q, k, v, g, beta)
  return call, fwdbwd


def fla_fns(op):
  import torch
  from fla.ops.delta_rule import chunk_delta_rule
  from fla.ops.gla import chunk_gla
  from fla.ops.linear_attn import chunk_linear_attn
  from fla.ops.simple_gla import chunk_simple_gla

  def call(q, k, v, g, beta):
    if op == "linear":
      return chunk_linear_attn(q, k, v, normalize=False)[0]
    if op == "simple_gla":
      return chunk_simple_gla(q, k, v, g)[0]
    if op == "gla":
      return chunk_gla(q, k, v, g)[0]
    return chunk_delta_rule(q, k, v, beta)[0]

  def fwdbwd(q, k, v, g, beta):
    o = call(q, k, v, g, beta)
    o.float().sum().backward()
    return o
  return torch, call, fwdbwd


def time_torch(torch, fn, *args):
  from triton.testing import do_bench
  return float(do_bench(lambda: fn(*args), warmup=10, rep=50, return_mode="median"))


def to_torch(torch, x, grad):
  if x is None:
    return None
  t = torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda()
  t = t.to(torch.bfloat16) if x.dtype == jnp.bfloat16 else t
  return t.requires_grad_(grad)


def model_cost(op, B, T, H, D, C=64, form="two_pass", bwd=False):
  """(FLOP, bytes) of one call under the model in the module docstring."""
  tok = B * T * H
  fl = tok * (4 * D * D + 2 * C * 2 * D)
  gate = {"linear": 0, "simple_gla": 4, "gla": 4 * D, "delta_rule": 4}[op]
  states = 2 * B * H * (T // C) * D * D          # chunk states, elements, written + read
  by = tok * (4 * D * 2 + gate)
  if op == "delta_rule":
    fl += tok * (2 * D * D + 2 * C * 3 * D)
    by += tok * 2 * D * 4 * 2                     # w, u (fp32) written and read
  if form == "two_pass":
    by += states * 2
  if bwd:
    fl *= 3
    by += states * 4 * 2 + tok * 7 * D * 2 + tok * gate   # fp32 h and dh, q k v do dq dk dv
  return fl, by


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ts", default="2048,4096,8192,16384,32768")
  ap.add_argument("--ops", default=",".join(OPS))
  ap.add_argument("--B", type=int, default=2)
  ap.add_argument("--H", type=int, default=16)
  ap.add_argument("--D", type=int, default=128)
  ap.add_argument("--no-fla", action="store_true")
  ap.add_argument("--no-jnp", action="store_true")
  ap.add_argument("--no-cudnn", action="store_true")
  ap.add_argument("--jnp-ts", default="2048,16384", help="T values that also time the jnp chunk")
  ap.add_argument("--gla-c32", action="store_true", help="also time Pallas GLA with chunk 32")
  ap.add_argument("--md", default=None, help="also write the table to this markdown file")
  a = ap.parse_args()
  B, H, D = a.B, a.H, a.D
  dev = jax.devices()[0]
  head = f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
  try:
    import fla
    import torch
    import triton
    head += f", torch {torch.__version__}, triton {triton.__version__}, fla {fla.__version__}"
  except Exception as e:  # noqa: BLE001
    head += f", fla unavailable ({type(e).__name__})"
  print(head, flush=True)
  hdr = ("| op | T | pass | linjax pallas ms | linjax jnp chunk ms | fla ms | linjax/fla | "
         "cuDNN attn ms | pallas TFLOP/s | pallas GB/s |")
  fmt = lambda x: "-" if x is None else (x if isinstance(x, str) else f"{x:.3f}")
  jnp_ts = {int(t) for t in a.jnp_ts.split(",") if t}
  ts = [int(t) for t in a.ts.split(",")]
  ops = a.ops.split(",") + (["gla@C32"] if a.gla_c32 else [])
  res = {}  # (impl, op_name, T, pass) -> ms or error string
  t_start = time.perf_counter()

  def note(key, val):
    res[key] = val
    print(f"  [{time.perf_counter() - t_start:6.0f}s] {key}: {fmt(val)}", flush=True)

  def parse(op_name):
    if "@C" in op_name:
      op, c = op_name.split("@C")
      return op, int(c)
    return op_name, 64

  def table():
    rows = []
    for T in ts:
      for op_name in ops:
        op, C = parse(op_name)
        for p, mult in [("fwd", 1), ("fwd+bwd", 1)]:
          fl, by = model_cost(op, B, T, H, D, C, "auto", p == "fwd+bwd")
          pl_ms, fla_ms = res.get(("pallas", op_name, T, p)), res.get(("fla", op, T, p))
          if C != 64:
            fla_ms = None
          ok = isinstance(pl_ms, float) and isinstance(fla_ms, float)
          tf = gb = None
          if isinstance(pl_ms, float):
            tf = fl * mult / (pl_ms * 1e-3) / 1e12
            gb = by * mult / (pl_ms * 1e-3) / 1e9
          rows.append(
              f"| {op_name} | {T} | {p} | {fmt(pl_ms)} | "
              f"{fmt(res.get(('jnp', op, T, p)) if C == 64 else None)} | "
              f"{fmt(fla_ms)} | {fmt(pl_ms / fla_ms if ok else None)} | "
              f"{fmt(res.get(('cudnn', 'attn', T, p)))} | {fmt(tf)} | "
              f"{'-' if gb is None else f'{gb:.0f}'} |")
    text = hdr + "\n|" + "---|" * 10 + "\n" + "\n".join(rows) + "\n"
    if a.md:
      with open(a.md, "w") as fh:
        fh.write(f"# Chunkwise kernels, B={B} H={H} D={D} bf16, causal\n\n{head}\n\n{text}")
    return text

  def err(e):
    return f"err {type(e).__name__}: {str(e)[:80]}"

  # Phase 1: linjax Pallas; 2: linjax jnp chunk; 3: cuDNN; 4: fla (its autotuning is slow, so
  # it goes last: a run cut short still has the linjax numbers). The table is rewritten after
  # every phase.
  for T in ts:
    for op_name in ops:
      op, C = parse(op_name)
      q, k, v, g, beta = make_inputs(op, B, T, H, D)
      f, fb = linjax_fns(op, "pallas", C)
      for p, fn in [("fwd", f), ("fwd+bwd", fb)]:
        try:
          note(("pallas", op_name, T, p), time_jax(fn, q, k, v, g, beta))
        except Exception as e:  # noqa: BLE001
          note(("pallas", op_name, T, p), err(e))
  table()
  if not a.no_jnp:
    for T in [t for t in ts if t in jnp_ts]:
      for op in a.ops.split(","):
        q, k, v, g, beta = make_inputs(op, B, T, H, D)
        for p in ["fwd", "fwd+bwd"]:
          try:
            f, fb = linjax_fns(op, "jnp")
            note(("jnp", op, T, p), time_jax(f if p == "fwd" else fb, q, k, v, g, beta))
          except Exception as e:  # noqa: BLE001
            note(("jnp", op, T, p), err(e))
    table()
  if not a.no_cudnn:
    for T in ts:
      q, k, v, _, _ = make_inputs("linear", B, T, H, D)
      f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation="cudnn")
      fb = lambda q, k, v: jax.value_and_grad(
          lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)
      for p, fn in [("fwd", f), ("fwd+bwd", fb)]:
        try:
          note(("cudnn", "attn", T, p), time_jax(fn, q, k, v))
        except Exception as e:  # noqa: BLE001
          note(("cudnn", "attn", T, p), err(e))
    table()
  if not a.no_fla:
    for op in a.ops.split(","):
      for T in ts:
        try:
          q, k, v, g, beta = make_inputs(op, B, T, H, D)
          torch, f, fb = fla_fns(op)
          tq, tk, tv = (to_torch(torch, x, True) for x in (q, k, v))
          tg, tb = to_torch(torch, g, True), to_torch(torch, beta, True)
          note(("fla", op, T, "fwd"), time_torch(torch, f, tq, tk, tv, tg, tb))
          try:
            note(("fla", op, T, "fwd+bwd"), time_torch(torch, fb, tq, tk, tv, tg, tb))
          except Exception as e:  # noqa: BLE001
            note(("fla", op, T, "fwd+bwd"), err(e))
          del tq, tk, tv, tg, tb
          torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
          note(("fla", op, T, "fwd"), err(e))
      table()
  print(table(), flush=True)


if __name__ == "__main__":
  main()
