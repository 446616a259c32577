"""The one prepared device run: correctness of every kernel, the issue's targets, the timing
table and a tile sweep, in a single call of <= 9 minutes on one H100 / H200.

  python benchmarks/gpu_run.py --out $OUT                      # on the GPU (budget 520 s)
  python benchmarks/gpu_run.py --dry-run --out /tmp/gpu_dry    # CPU, interpret mode, tiny

Compilation dominates a run, so the steps go in order of value and each result is written
as it finishes: one JSON line per result to OUT/gpu_run.jsonl, and OUT/gpu_run.md rewritten
after every step. A step whose time estimate (the longest step of its kind so far, or a
default) exceeds the budget left is recorded as "skipped (budget)", never half-run.

  A  correctness, fwd + bwd of every kernel vs `linjax.ops.reference` in fp32 at matmul
     precision "highest" (the kernels at the default, production precision): bf16 K = 128
     with strong gates (both forward forms; the jnp chunk method on the same inputs beside
     it), fp32 K = 128, packed rows (segment_ids), cu_seqlens with an empty sequence and
     tokens after the last one, head dim 256, T = 4096 bf16. Tolerances: fla's (o, dq, dk,
     dv 5e-3; dg, dbeta 1e-2) for bf16, 1e-4 for fp32 (benchmarks/accuracy.py). The five
     bf16 kernels and fp32 GLA run first, the other cases after B.
  B  the targets: the copy bandwidth probed on the device (a jitted copy of 1 GiB); simple
     GLA forward at T = 32k (both forms) against its IO floor (q, k, v read + o written at
     that bandwidth); simple GLA fwd + bwd at T = 16k against cuDNN flash attention
     (`jax.nn.dot_product_attention(implementation="cudnn")`); fla's Triton kernels at the
     same shapes when importable (torch + triton + fla in this process).
  C  the table (B=2, H=16, D=128, bf16, causal, chunk 64; T = 2k .. 32k): linjax Pallas fused
     and two-pass, linjax jnp chunk (T <= 16k), cuDNN attention, fla; TFLOP/s, GB/s and the
     share of the probed bandwidth per row (the model of benchmarks/kernels.py).
  D  a tile sweep of the fused forward and the state pass (`pallas_kernels.tiling`), printed
     as TABLE rows to commit in tiling.py.

--dry-run runs every step on the CPU (Pallas' interpreter, T = 64, D = 32, B=1, H=2, no
cuDNN: XLA attention instead, no fla) so the script cannot rot; tests run it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "gpu_run_out"))
  ap.add_argument("--budget", type=float, default=520.0, help="seconds for the whole run")
  ap.add_argument("--dry-run", action="store_true")
  ap.add_argument("--no-fla", action="store_true")
  ap.add_argument("--ts", default="2048,4096,8192,16384,32768")
  return ap.parse_args(argv)


class Run:
  """Budget, results file and markdown; every step goes through `step`."""

  def __init__(self, a):
    self.a = a
    self.t0 = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    self.jsonl = os.path.join(a.out, "gpu_run.jsonl")
    self.md = os.path.join(a.out, "gpu_run.md")
    open(self.jsonl, "w").close()
    self.rows = []          # (section, name, dict)
    self.longest = {}       # kind -> longest seconds so far
    self.head = ""

  def left(self):
    return self.a.budget - (time.perf_counter() - self.t0)

  def add(self, section, name, res):
    res = dict(res, t=round(time.perf_counter() - self.t0, 1))
    self.rows.append((section, name, res))
    with open(self.jsonl, "a") as f:
      f.write(json.dumps({"section": section, "name": name, **res}, default=str) + "\n")
    print(f"[{res['t']:6.0f}s] {section} {name}: {res}", flush=True)
    self.write()

  def step(self, section, name, kind, fn, default_s):
    est = self.longest.get(kind, default_s)
    if self.left() < est:
      self.add(section, name, {"status": f"skipped (budget: {self.left():.0f}s left, "
                                         f"step estimate {est:.0f}s)"})
      return None
    t = time.perf_counter()
    try:
      res = fn()
      res.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
      res = {"status": f"error {type(e).__name__}: {str(e)[:300]}",
             "trace": traceback.format_exc()[-1500:]}
    dur = time.perf_counter() - t
    self.longest[kind] = max(self.longest.get(kind, 0.0), dur)
    res["step_s"] = round(dur, 1)
    self.add(section, name, res)
    return res

  def write(self):
    f3 = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    lines = [f"# benchmarks/gpu_run.py"
             f"{' (DRY RUN on CPU: interpret mode, tiny shapes)' if self.a.dry_run else ''}",
             "", self.head, "", f"Elapsed {time.perf_counter() - self.t0:.0f} s of a "
             f"{self.a.budget:.0f} s budget. Command: `python benchmarks/gpu_run.py"
             f"{' --dry-run' if self.a.dry_run else ''} --out OUT`.", ""]
    rows = lambda sec: [(n, r) for s, n, r in self.rows if s == sec]
    if rows("A"):
      whats = ("o", "o_two_pass", "S", "dq", "dk", "dv", "dh0", "dg", "dbeta", "tail")
      lines += ["## A. Correctness vs reference.py (fp32, 'highest'); kernels at production "
                "precision", "", "| case | status | impl | " + " | ".join(whats) + " |",
                "|" + "---|" * (3 + len(whats))]
      for n, r in rows("A"):
        impls = sorted({k.split(".")[0] for k in r if "." in k}, reverse=True) or ["-"]
        for i in impls:
          lines.append(f"| {n} | {r['status'] if i in ('pallas', '-') else ''} | {i} | "
                       + " | ".join(f3(r.get(f"{i}.{w}")) for w in whats) + " |")
      lines.append("")
    for sec, title in (("B", "B. Targets"), ("C", "C. Timing (median ms)"),
                       ("D", "D. Tile sweep (simple GLA)")):
      if not rows(sec):
        continue
      lines += [f"## {title}", "", "| step | ms | TFLOP/s | GB/s | share of copy BW | other |",
                "|---|---|---|---|---|---|"]
      for n, r in rows(sec):
        other = {k: v for k, v in r.items()
                 if k not in ("ms", "TFLOPs", "GBs", "bw_share", "trace", "t", "step_s")}
        lines.append(f"| {n} | {f3(r.get('ms'))} | {f3(r.get('TFLOPs'))} | {f3(r.get('GBs'))}"
                     f" | {f3(r.get('bw_share'))} | "
                     + ", ".join(f"{k}={f3(v)}" for k, v in other.items()) + " |")
      lines.append("")
    with open(self.md, "w") as f:
      f.write("\n".join(lines))


def main(argv=None):
  a = _args(argv)
  if a.dry_run:
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import jax.numpy as jnp
  import numpy as np

  import accuracy as acc
  import kernels as kb
  from pallas_kernels import tiling

  run = Run(a)
  dev = jax.devices()[0]
  run.head = (f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
              f"python {platform.python_version()}, {platform.machine()}")
  interpret = "plain" if a.dry_run else False
  fla_ok = False
  if not a.no_fla and not a.dry_run:
    try:
      import fla  # noqa: F401
      import torch
      import triton
      fla_ok = torch.cuda.is_available()
      run.head += (f", torch {torch.__version__}, triton {triton.__version__}, "
                   f"fla {fla.__version__}")
    except Exception as e:  # noqa: BLE001
      run.head += f", fla unavailable ({type(e).__name__}: {str(e)[:80]})"
  run.add("env", "device", {"head": run.head, "dry_run": a.dry_run})

  # ------------------------------------------------------------------ A: correctness
  bf, f32 = jnp.bfloat16, jnp.float32
  if a.dry_run:  # one case of each kind the script handles (bf16 + chunk, fp32, packing)
    Tc, Kc, C = 32, 16, 16
    cases = [("bf16 K=16 strong", "simple_gla", dict(T=Tc, K=Kc, strength="strong")),
             ("fp32 K=16", "linear", dict(T=Tc, K=Kc, strength="weak", dtype=f32)),
             ("cu_seqlens (empty seq, tail)", "gla", dict(T=Tc, K=Kc, strength="weak",
                                                          packing="varlen"))]
  else:
    C = 64
    strong = dict(T=1000, K=128, strength="strong")
    cases = ([(f"bf16 K=128 T=1000 strong", k, strong) for k in
              ("simple_gla", "gla", "gated_delta", "linear", "delta")]
             + [(f"fp32 K=128 T=333", k, dict(T=333, K=128, strength="weak", dtype=f32))
                for k in ("gla", "linear", "gated_delta")]
             + [("segment_ids bf16 K=128 T=500", k, dict(T=500, K=128, strength="strong",
                                                         packing="segments"))
                for k in ("simple_gla", "gated_delta")]
             + [("cu_seqlens bf16 K=128 T=600 (empty seq, tail)", k,
                 dict(T=600, K=128, strength="weak", packing="varlen"))
                for k in ("gla", "gated_delta")]
             + [("head dim 256 bf16 T=300", k, dict(T=300, K=256, strength="strong"))
                for k in ("gla", "gated_delta")]
             + [("bf16 K=128 T=4096 weak", k, dict(T=4096, K=128, strength="weak"))
                for k in acc.KERNELS])
  def correctness_cases(cases):
    for label, kernel, kw in cases:
      fp32 = kw.get("dtype") == f32
      with_chunk = not fp32 and kw.get("packing") is None and kw["K"] <= 128
      impls = ("pallas", "chunk") if with_chunk else ("pallas",)

      def correctness(kernel=kernel, kw=kw, impls=impls, fp32=fp32):
        res = acc.errors(kernel, kw["T"], kw["K"], kw["strength"], C=C,
                         dtype=kw.get("dtype", bf), packing=kw.get("packing"),
                         interpret=interpret, impls=impls)
        bad = acc.within(res["pallas"], fp32=fp32)
        out = {f"{i}.{w}": float(f"{v:.3g}") for i, e in res.items() for w, v in e.items()}
        out["status"] = "PASS" if not bad else f"FAIL {bad}"
        return out
      run.step("A", f"{kernel}: {label}", "A", correctness, 60.0)

  # the bf16 kernels and the fp32 GLA case first, then the targets, then the other cases
  first = 2 if a.dry_run else 6
  correctness_cases(cases[:first])

  # ------------------------------------------------------------------ B: targets
  B, H, D = (1, 2, 32) if a.dry_run else (2, 16, 128)
  ts = [32] if a.dry_run else [int(t) for t in a.ts.split(",")]
  T_fwd = ts[-1]
  T_bwd = ts[-1] if a.dry_run else 16384
  bw = {}

  def probe():
    n = (1 << 20) if a.dry_run else (1 << 29)        # bf16 elements: 2 MiB / 1 GiB
    x = jnp.ones((n,), bf)
    f = jax.jit(lambda x: x * 1)
    ms = kb.time_jax(f, x)
    bw["GBs"] = 2 * n * 2 / (ms * 1e-3) / 1e9        # read + write
    return {"copy_GBs": bw["GBs"], "ms": ms, "bytes": 2 * n * 2}
  run.step("B", "copy bandwidth", "probe", probe, 20.0)

  def timing(op, impl, T, passname, form="auto"):
    q, k, v, g, beta = kb.make_inputs(op, B, T, H, D)
    if impl == "cudnn":
      impl_name = "xla" if a.dry_run else "cudnn"
      f = lambda q, k, v, g, beta: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation=impl_name)
      fb = lambda q, k, v, g, beta: jax.value_and_grad(
          lambda q, k, v: f(q, k, v, None, None).astype(f32).sum(), (0, 1, 2))(q, k, v)
    else:
      f, fb = kb.linjax_fns(op, impl, C if a.dry_run else 64, form=form, interpret=interpret)
    ms = kb.time_jax(f if passname == "fwd" else fb, q, k, v, g, beta)
    res = {"ms": ms}
    if impl in ("pallas", "jnp"):
      used = form if impl == "pallas" else "two_pass"
      if impl == "pallas" and form == "auto":
        used = "fused" if tiling.use_fused("gpu", B, H, D, T // 64, bf) else "two_pass"
        res["form"] = used
      fl, by = kb.model_cost(op, B, T, H, D, 64, used, passname == "fwd+bwd")
      res.update(TFLOPs=fl / (ms * 1e-3) / 1e12, GBs=by / (ms * 1e-3) / 1e9)
      if bw.get("GBs"):
        res["bw_share"] = res["GBs"] / bw["GBs"]
    else:
      fl = 2 * B * H * T * T * D * (3.5 if passname == "fwd+bwd" else 1.0)
      res["TFLOPs"] = fl / (ms * 1e-3) / 1e12
    return res

  def target_fwd(form):
    def go():
      res = timing("simple_gla", "pallas", T_fwd, "fwd", form)
      fl, by_floor = kb.model_cost("simple_gla", B, T_fwd, H, D, 64, "fused")
      if bw.get("GBs"):
        floor = by_floor / (bw["GBs"] * 1e9) * 1e3
        res.update(io_floor_ms=floor, x_floor=res["ms"] / floor,
                   target="<= 2x the IO floor", met=bool(res["ms"] <= 2 * floor))
      return res
    return go
  for form in ("auto", "fused", "two_pass"):
    run.step("B", f"simple_gla T={T_fwd} fwd pallas {form}", "time", target_fwd(form), 40.0)
  res_l = run.step("B", f"simple_gla T={T_bwd} fwd+bwd pallas", "time",
                   lambda: timing("simple_gla", "pallas", T_bwd, "fwd+bwd"), 40.0)
  res_c = run.step("B", f"cudnn attention T={T_bwd} fwd+bwd", "time",
                   lambda: timing("attn", "cudnn", T_bwd, "fwd+bwd"), 40.0)
  if res_l and res_c and "ms" in res_l and "ms" in res_c:
    run.add("B", f"target fwd+bwd T={T_bwd}: linjax simple_gla > 10x faster than cuDNN",
            {"speedup": res_c["ms"] / res_l["ms"], "met": res_c["ms"] / res_l["ms"] > 10})

  def fla_time(op, T, passname):
    torch, f, fb = kb.fla_fns(op)
    q, k, v, g, beta = kb.make_inputs(op, B, T, H, D)
    tq, tk, tv = (kb.to_torch(torch, x, True) for x in (q, k, v))
    tg, tb = kb.to_torch(torch, g, True), kb.to_torch(torch, beta, True)
    try:
      return {"ms": kb.time_torch(torch, f if passname == "fwd" else fb, tq, tk, tv, tg, tb)}
    finally:
      del tq, tk, tv, tg, tb
      torch.cuda.empty_cache()
  if fla_ok:
    for op in ("simple_gla", "gla", "linear"):
      for passname in ("fwd", "fwd+bwd"):
        run.step("B", f"fla {op} T={T_bwd} {passname}", "fla",
                 lambda op=op, p=passname: fla_time(op, T_bwd, p), 60.0)
  else:
    run.add("B", "fla", {"status": "not run (dry run or fla / torch CUDA not importable)"})

  correctness_cases(cases[first:])

  # ------------------------------------------------------------------ C: the table
  ops_ = ["delta_rule"] if a.dry_run else ["simple_gla", "gla", "linear", "delta_rule"]
  for T in ts:
    for op in ops_:
      for form in ("fused", "two_pass"):
        for passname in ("fwd", "fwd+bwd"):
          run.step("C", f"{op} T={T} {passname} pallas {form}", "time",
                   lambda op=op, T=T, p=passname, form=form: timing(op, "pallas", T, p, form),
                   40.0)
    run.step("C", f"cudnn attention T={T} fwd", "time",
             lambda T=T: timing("attn", "cudnn", T, "fwd"), 30.0)
  for T in [t for t in ts if t <= 16384]:
    for op in ops_:
      for passname in ("fwd", "fwd+bwd"):
        run.step("C", f"{op} T={T} {passname} jnp chunk", "time",
                 lambda op=op, T=T, p=passname: timing(op, "jnp", T, p), 40.0)
  if fla_ok:
    for T in ts:
      for op in ("simple_gla", "gla", "linear", "delta_rule"):
        for passname in ("fwd", "fwd+bwd"):
          run.step("C", f"fla {op} T={T} {passname}", "fla",
                   lambda op=op, T=T, p=passname: fla_time(op, T, p), 60.0)

  # ------------------------------------------------------------------ D: tile sweep
  T_sw = ts[0] if a.dry_run else 16384
  sweep = ([tiling.Tiles(BV=16, num_warps=4)] if a.dry_run else
           [tiling.Tiles(BK=bk, BV=bv, num_warps=w, num_stages=st, measured=True)
            for bv in (32, 64) for bk in (64, 128) for w in (4, 8) for st in (2,)])
  for kernel, passname in (("fused", "fwd"), ("state", "fwd+bwd"))[:1 if a.dry_run else 2]:
    for t in sweep:
      def go(t=t, kernel=kernel, passname=passname):
        with tiling.override(tiles={(kernel, "bfloat16"): t}, fused=kernel == "fused"):
          return dict(timing("simple_gla", "pallas", T_sw, passname,
                             "fused" if kernel == "fused" else "two_pass"),
                      tiles=str(t))
      run.step("D", f"{kernel} {t}", "time", go, 40.0)
  run.write()
  print(open(run.md).read())
  return run


if __name__ == "__main__":
  main()
