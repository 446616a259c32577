"""bf16 accuracy of the Pallas kernels, every output and gradient, beside linjax's jnp chunk
method on the same inputs, both against the fp32 token-by-token reference.

  python benchmarks/accuracy.py                              # the default table (CPU)
  python benchmarks/accuracy.py --ts 64,512,4096 --ks 64,128 --md benchmarks/results/kernels_accuracy_cpu.md

Kernels: linear (no gate), simple_gla (per-head gate), gla (per-channel gate), delta
(DeltaNet), gated_delta. Inputs, bf16: q, k, v ~ N(0, 1) (k scaled by K^-1/2; L2-normalised
for the delta rule), beta = 2 sigmoid(N(0, 1)) in (0, 2), log gates per step weak (-U(0, 0.01))
or strong (-U(0, 10)), initial state N(0, 1) (fp32), B = 1, H = 2, V = K, chunk 64.
Error: ||ref - x|| / ||ref|| in float64, ref = `linjax.ops.reference` in fp32 on the same
(bf16-rounded) inputs; gradients of sum(o * do) + sum(S_T * dS) with random N(0, 1) do, dS.
"pallas" is `pallas_kernels` through its GPU (Triton) structure in Pallas' interpreter, so
it runs the kernels' own arithmetic (bf16 operands, fp32 accumulation; the state path of the
delta rule in full precision) on the CPU; o is given for both forward forms (the backward is
one: it recomputes the chunk states in fp32). "chunk" is `linjax.ops.<op>(method="chunk")`.
Targets (fla's tolerances): o, dq, dk, dv (and dh0) <= 5e-3; dg, dbeta <= 1e-2.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402
from linjax import ops  # noqa: E402
from linjax.ops import reference  # noqa: E402

KERNELS = ("linear", "simple_gla", "gla", "delta", "gated_delta")
TOL = {"o": 5e-3, "o_two_pass": 5e-3, "dq": 5e-3, "dk": 5e-3, "dv": 5e-3, "dh0": 5e-3,
       "dg": 1e-2, "dbeta": 1e-2}
F32 = jnp.float32


def rel_err(ref, out):
  ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
  if not np.isfinite(out).all():
    return float("nan")
  return float(np.linalg.norm(ref - out) / max(np.linalg.norm(ref), 1e-300))


def packed_ids(B, T):
  """[B, T] segment ids: boundaries at T/3 (inside a chunk) and 2T/3, an id that returns
  (1, 2, 1), trailing padding in row 0; later rows without a boundary."""
  seg = np.zeros((B, T), np.int32)
  a, b = T // 3 + 5, 2 * T // 3
  seg[0, :a], seg[0, a:b], seg[0, b:T - 3], seg[0, T - 3:] = 1, 2, 1, 0
  seg[1:] = 7
  return jnp.asarray(seg)


def varlen_offsets(T):
  """cu_seqlens with an empty sequence and 5 tokens after cu_seqlens[-1]."""
  return jnp.array([0, T // 4, T // 4, 3 * T // 4 + 3, T - 5], jnp.int32)


def inputs(kernel, T, K, strength, seed=0, H=2, B=1, V=None, dtype=jnp.bfloat16, n_states=None):
  V = K if V is None else V
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  delta = kernel in ("delta", "gated_delta")
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, H, K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True) if delta else k * K ** -0.5
  v = jax.random.normal(ks[2], (B, T, H, V))
  x = dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype),
           h0=jax.random.normal(ks[3], (n_states or B, H, K, V)))
  gshape = {"simple_gla": (B, T, H), "gla": (B, T, H, K), "gated_delta": (B, T, H)}.get(kernel)
  if gshape is not None:
    hi = 0.01 if strength == "weak" else 10.0
    x["g"] = -jax.random.uniform(ks[4], gshape, F32, 0.0, hi)
  if delta:
    x["beta"] = 2.0 * jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)))
  do = jax.random.normal(ks[6], (B, T, H, V))
  dS = jax.random.normal(ks[7], (n_states or B, H, K, V))
  return x, do, dS


def _call(kernel, impl, C, form="auto", interpret="plain", packing=None):
  """packing: None, ("segments", ids) or ("varlen", cu_seqlens)."""
  delta = kernel in ("delta", "gated_delta")
  pk = {}
  if packing is not None:
    pk = {"segment_ids" if packing[0] == "segments" else "cu_seqlens": packing[1]}

  def fn(q, k, v, h0, g=None, beta=None):
    kw = dict(initial_state=h0, output_final_state=True, **pk)
    if impl == "reference":
      with jax.default_matmul_precision("highest"):   # no TF32 / bf16 passes on a GPU
        return (reference.delta_rule(q, k, v, beta, g, **kw) if delta
                else reference.gla(q, k, v, g, **kw))
    kw["chunk_size"] = C
    if impl == "chunk":
      return (ops.delta_rule(q, k, v, beta, g, method="chunk", **kw) if delta
              else ops.gla(q, k, v, g, method="chunk", **kw))
    kw.update(interpret=interpret, form=form)
    return (pallas_kernels.delta_rule_chunk(q, k, v, beta, g, **kw) if delta
            else pallas_kernels.gla_chunk(q, k, v, g, **kw))
  return fn


def _run(fn, x, do, dS):
  names = sorted(x)

  @jax.jit
  def go(args):
    def loss(args):
      o, S = fn(**args)
      return (o.astype(F32) * do).sum() + (S * dS).sum(), (o, S)
    (_, (o, S)), g = jax.value_and_grad(loss, has_aux=True)(args)
    return o, S, g

  return go({n: x[n] for n in names})


def errors(kernel, T, K, strength, C=64, seed=0, *, dtype=jnp.bfloat16, B=1, H=2, V=None,
           packing=None, interpret="plain", impls=("pallas", "chunk")):
  """{impl: {what: err}} for one configuration ("pallas": its fused forward's o and every
  gradient, plus "o_two_pass"; "chunk": the jnp chunk method). packing: None, "segments"
  (B >= 2 packed rows) or "varlen" (cu_seqlens, B = 1; tokens after the last sequence get
  no cotangent and must be zero)."""
  pack, n_states, live = None, None, None
  if packing == "segments":
    B = max(B, 2)
    pack = ("segments", packed_ids(B, T))
  elif packing == "varlen":
    B, cu = 1, varlen_offsets(T)
    pack, n_states = ("varlen", cu), int(cu.shape[0]) - 1
    live = np.arange(T) < int(cu[-1])
  x, do, dS = inputs(kernel, T, K, strength, seed, H=H, B=B, V=V, dtype=dtype,
                     n_states=n_states)
  if live is not None:
    do = jnp.where(live[None, :, None, None], do, 0.0)
  f32 = {n: a.astype(F32) for n, a in x.items()}
  ref = _run(_call(kernel, "reference", C, packing=pack), f32, do, dS)
  sel = (lambda o: np.asarray(o, np.float32)[:, live]) if live is not None else (lambda o: o)
  out = {}
  for impl in impls:
    o, S, g = _run(_call(kernel, impl, C, "fused", interpret, pack), x, do, dS)
    e = {"o": rel_err(sel(ref[0]), sel(o)), "S": rel_err(ref[1], S)}
    if live is not None:
      e["tail"] = float(np.abs(np.asarray(o, np.float32)[:, ~live]).max())
    for n in ref[2]:
      e["dh0" if n == "h0" else "d" + n] = rel_err(ref[2][n], g[n])
    if impl == "pallas":
      o2, _ = jax.jit(_call(kernel, "pallas", C, "two_pass", interpret, pack))(**x)
      e["o_two_pass"] = rel_err(sel(ref[0]), sel(o2))
    out[impl] = e
  return out


F32_TOL = 1e-4


def within(e, fp32=False):
  """The quantities of one error dict above their target tolerance (fp32 inputs: 1e-4 on
  every one); a non-zero output after the last sequence counts too."""
  bad = {w: v for w, v in e.items()
         if w in TOL and not v <= (F32_TOL if fp32 else TOL[w])}
  if e.get("tail", 0.0) != 0.0:
    bad["tail"] = e["tail"]
  return bad


COLS = ("o", "o_two_pass", "S", "dq", "dk", "dv", "dh0", "dg", "dbeta")


def table(rows):
  head = "| kernel | T | K | gates | impl | " + " | ".join(COLS) + " |"
  lines = [head, "|" + "---|" * (5 + len(COLS))]
  for (kernel, T, K, strength), res in rows:
    for impl in ("pallas", "chunk"):
      e = res[impl]
      cells = []
      for c in COLS:
        v = e.get(c)
        cell = "-" if v is None else f"{v:.1e}"
        if v is not None and c in TOL and not v <= TOL[c]:
          cell = f"**{cell}**"
        cells.append(cell)
      gates = strength if kernel in ("simple_gla", "gla", "gated_delta") else "-"
      lines.append(f"| {kernel} | {T} | {K} | {gates} | {impl} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--kernels", default=",".join(KERNELS))
  ap.add_argument("--ts", default="64,512")
  ap.add_argument("--ks", default="64")
  ap.add_argument("--strengths", default="weak,strong")
  ap.add_argument("--md", default=None)
  a = ap.parse_args()
  rows = []
  t0 = time.time()
  head = (f"jax {jax.__version__}, backend {jax.default_backend()}, {platform.machine()}, "
          f"{os.cpu_count()} CPU cores")
  print(head, flush=True)
  for T in map(int, a.ts.split(",")):
    for K in map(int, a.ks.split(",")):
      for kernel in a.kernels.split(","):
        gated = kernel in ("simple_gla", "gla", "gated_delta")
        for strength in (a.strengths.split(",") if gated else ["weak"]):
          t = time.time()
          res = errors(kernel, T, K, strength)
          rows.append(((kernel, T, K, strength), res))
          bad = {i: within(res[i]) for i in res}
          print(f"[{time.time() - t0:6.0f}s] {kernel} T={T} K={K} {strength}: "
                + "; ".join(f"{i} " + " ".join(f"{w}={v:.1e}" for w, v in res[i].items())
                            for i in res)
                + (f"  ABOVE TOL {bad}" if any(bad.values()) else "")
                + f" ({time.time() - t:.0f}s)", flush=True)
          if a.md:
            with open(a.md + ".partial", "w") as f:
              f.write(table(rows))
  text = table(rows)
  print(text)
  if a.md:
    with open(a.md, "w") as f:
      f.write(report(rows, head, time.time() - t0, " ".join(sys.argv[1:])))
    os.remove(a.md + ".partial")


def report(rows, head, seconds, argv):
  """The results markdown: what was run, the worst error of each quantity, the table."""
  worst = {}
  for _, res in rows:
    for impl, e in res.items():
      for w, v in e.items():
        if w in TOL:
          worst[(impl, w)] = max(worst.get((impl, w), 0.0), v)
  cols = [c for c in COLS if c in TOL and any((i, c) in worst for i in ("pallas", "chunk"))]
  over = [f"{i} {c}" for (i, c), v in worst.items() if not v <= TOL[c]]
  lines = [
      "# bf16 accuracy of the Pallas kernels beside the jnp chunk method (CPU, interpret mode)",
      "",
      f"Command: `python benchmarks/accuracy.py {argv}`; {head}; "
      f"{time.strftime('%Y-%m-%d')}, {seconds:.0f} s.",
      "",
      "Relative errors ||ref - x|| / ||ref|| against the fp32 token-by-token reference on the "
      "same bf16-rounded inputs (the module docstring of `benchmarks/accuracy.py` has the "
      "inputs). `pallas` is the kernels' own arithmetic run by Pallas' interpreter through "
      "their GPU (Triton) structure; the three-pass bf16 matmuls they use on a GPU for the "
      "delta rule's state path and WY form compute in fp32 on the CPU (their own error, ~1e-5 "
      "relative, is below this table's resolution). Bold: above fla's tolerance (o, dq, dk, "
      "dv, dh0 5e-3; dg, dbeta 1e-2).",
      "",
      "Worst over the table (pallas / chunk): " + "; ".join(
          f"{c} " + " / ".join(f"{worst[(i, c)]:.1e}" if (i, c) in worst else "-"
                               for i in ("pallas", "chunk")) for c in cols) + ".",
      "",
      ("Every entry is within the tolerances." if not over else
       "Above tolerance: " + ", ".join(over) + "."),
      "",
      table(rows)]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
