"""LASP-2 / LASP-2H on 8 fake CPU devices equal the single-device ops (values and gradients).

Each test runs one subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=8 set before
JAX starts) that bundles many checks into a few compiled programs. Inputs encode their
position (a sinusoid of t on top of noise) so a misordered shard shows.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_parallel import run_worker  # noqa: E402

TOL = 1e-5


def test_lasp2_linear_families_meshes():
  out = run_worker(__file__, "linear")
  assert "LINEAR OK" in out, out


def test_lasp2_varlen_across_shards():
  out = run_worker(__file__, "varlen")
  assert "VARLEN OK" in out, out


def test_lasp2_runs_the_pallas_kernels():
  out = run_worker(__file__, "pallas")
  assert "PALLAS OK" in out, out


def test_lasp2h_attention_and_hlo():
  out = run_worker(__file__, "attention_hlo")
  assert "ATTN OK" in out and "HLO OK" in out, out


def test_llama_train_step_data_seq_fsdp():
  out = run_worker(__file__, "llama_step")
  assert "LLAMA STEP OK" in out, out


# ---------------------------------------------------------------- worker (subprocess) ---

def _setup():
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 8, jax.devices()


def posenc(shape, seed, scale=1.0):
  """Noise plus a sinusoid of the token position (axis 1)."""
  import jax.numpy as jnp
  import numpy as np
  T = shape[1]
  r = np.random.RandomState(seed).randn(*shape)
  t = np.arange(T).reshape((1, T) + (1,) * (len(shape) - 2))
  return jnp.asarray(scale * (0.5 * r + np.sin(0.05 * t + seed)), jnp.float32)


def rel(a, b):
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape and np.isfinite(b).all()
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def _linear_inputs(B, T, H, K, V, N):
  import jax
  import jax.numpy as jnp
  k = posenc((B, T, H, K), 2, .5)
  return dict(
      q=posenc((B, T, H, K), 1, .5), k=k, v=posenc((B, T, H, V), 3),
      gh=-jax.nn.softplus(posenc((B, T, H), 4)) * 0.3,
      gc=-jax.nn.softplus(posenc((B, T, H, K), 5)) * 0.3,
      beta=jax.nn.sigmoid(posenc((B, T, H), 6)),
      kn=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
      S0=posenc((N, H, K, V), 7),
      # normalize=True: positive features, state [.., V + 1] with the key sum last
      qp=jax.nn.softplus(posenc((B, T, H, K), 8)), kp=jax.nn.softplus(posenc((B, T, H, K), 9)),
      S0n=jnp.abs(posenc((N, H, K, V + 1), 10)))


FAMILIES = ("linear", "scalar_gate", "channel_gate", "normalized", "delta", "gated_delta")


# The delta rule's chunk method once used jaxlib's CPU triangular solve (LAPACK), which
# deadlocked when 8 fake devices called it at once; it now inverts its UT block with matmuls
# (`pallas_kernels._common.inv_unit_lower`), so the delta rule runs the same methods as the rest.


def _linear_losses(f, a, do, dS, **kw):
  """Per family: sum(o * do) + sum(S_T * dS) (cotangents for every output), plus outputs."""
  dkw = dict(kw)
  calls = {
      "linear": lambda: f.gla(a["q"], a["k"], a["v"], None, **kw),
      "scalar_gate": lambda: f.gla(a["q"], a["k"], a["v"], a["gh"], **kw),
      "channel_gate": lambda: f.gla(a["q"], a["k"], a["v"], a["gc"], **kw),
      "normalized": lambda: f.gla(a["qp"], a["kp"], a["v"], a["gh"], normalize=True,
                                  **dict(kw, initial_state=a["S0n"])),
      "delta": lambda: f.delta_rule(a["q"], a["kn"], a["v"], a["beta"], None, **dkw),
      "gated_delta": lambda: f.delta_rule(a["q"], a["kn"], a["v"], a["beta"], a["gh"], **dkw),
  }
  import jax.numpy as jnp
  out = {}
  for name in FAMILIES:
    o, S = calls[name]()
    out[name] = (jnp.sum(o * do) + jnp.sum(S[..., :dS.shape[-1]] * dS), o, S)
  return out


def _linear_program(f, do, dS, kw):
  import jax

  def fn(a):
    res = _linear_losses(f, a, do, dS, initial_state=a["S0"], output_final_state=True, **kw)
    return sum(r[0] for r in res.values()), {n: r[1:] for n, r in res.items()}
  return jax.jit(jax.value_and_grad(fn, has_aux=True))


def _reference(a, do, dS, kw):
  """Single-device values and gradients (linjax.ops, no mesh), computed once per worker."""
  from linjax import ops
  (_, ref), gref = _linear_program(ops, do, dS, kw)(a)
  return ref, gref


def _compare_linear(mesh, a, do, dS, kw, label, reference):
  from linjax import parallel
  from linjax.parallel import sequence as sp

  ref, gref = reference
  with parallel.use_mesh(mesh):
    (_, got), ggot = _linear_program(sp, do, dS, kw)(a)
  worst = 0.0
  for n in FAMILIES:
    for what, x, y in (("o", ref[n][0], got[n][0]), ("final_state", ref[n][1], got[n][1])):
      e = rel(x, y)
      worst = max(worst, e)
      assert e <= TOL, f"{label} {n} {what}: rel err {e:.2e}"
  for key in a:  # gradients of the bundled loss w.r.t. every input
    e = rel(gref[key], ggot[key])
    worst = max(worst, e)
    assert e <= TOL, f"{label} grad {key}: rel err {e:.2e}"
  print(f"{label}: worst rel err {worst:.1e}")


def worker_linear():
  _setup()
  from linjax import parallel
  B, T, H, K, V = 4, 32, 2, 8, 6
  a = _linear_inputs(B, T, H, K, V, B)
  do, dS = posenc((B, T, H, V), 11), posenc((B, H, K, V), 12)
  reference = _reference(a, do, dS, dict(method="recurrent"))
  for data, seq, tensor, method in ((4, 2, 1, "recurrent"), (2, 4, 1, "chunk"),
                                    (1, 8, 1, "recurrent"), (2, 2, 2, "recurrent")):
    mesh = parallel.make_mesh(data=data, seq=seq, tensor=tensor)
    kw = dict(method=method) if method == "recurrent" else dict(method=method, chunk_size=4)
    _compare_linear(mesh, a, do, dS, kw, f"data={data} seq={seq} tensor={tensor} {method}",
                    reference)
  print("LINEAR OK")


def worker_varlen():
  _setup()
  import jax.numpy as jnp
  import numpy as np
  from linjax import parallel
  T, H, K, V = 64, 2, 8, 6
  # boundaries inside shards, on a shard start (48), an empty sequence, and (seq=8: shards
  # of 8) a sequence (23..40) that runs through a whole shard.
  cu = jnp.array([0, 5, 5, 23, 40, 48, 64], jnp.int32)
  N = cu.shape[0] - 1
  a = _linear_inputs(1, T, H, K, V, N)
  do, dS = posenc((1, T, H, V), 11), posenc((N, H, K, V), 12)
  kw = dict(method="recurrent", cu_seqlens=cu)
  reference = _reference(a, do, dS, kw)
  for data, seq in ((2, 4), (1, 8)):
    mesh = parallel.make_mesh(data=data, seq=seq)
    _compare_linear(mesh, a, do, dS, kw, f"varlen data={data} seq={seq}", reference)
  # [B, T] packed rows (the trainer's segment_ids): boundaries inside shards and on a shard
  # start (16, 32), a segment running through whole shards (row 0: 20..47), an id that
  # comes back after another (row 1: 3, 4, 3), trailing padding (id 0), one row without a
  # boundary at all (row 2).
  B = 4
  seg = np.zeros((B, T), np.int32)
  seg[0, :5], seg[0, 5:20], seg[0, 20:48], seg[0, 48:60] = 1, 2, 3, 4
  seg[1, :16], seg[1, 16:32], seg[1, 32:41], seg[1, 41:] = 3, 4, 3, 5
  seg[2] = 7
  seg[3, :9], seg[3, 9:10], seg[3, 10:33] = 1, 2, 3
  a = _linear_inputs(B, T, H, K, V, B)
  do, dS = posenc((B, T, H, V), 11), posenc((B, H, K, V), 12)
  seg = jnp.asarray(seg)
  reference = _reference(a, do, dS, dict(method="recurrent", segment_ids=seg))
  for data, seq, method in ((2, 4, "chunk"), (1, 8, "recurrent"), (4, 2, "assoc_scan")):
    mesh = parallel.make_mesh(data=data, seq=seq)
    kw = dict(method=method, segment_ids=seg)
    if method != "recurrent":
      kw["chunk_size"] = 4
    _compare_linear(mesh, a, do, dS, kw, f"segment_ids data={data} seq={seq} {method}",
                    reference)
  print("VARLEN OK")


def worker_pallas():
  """LASP-2 with the local op on the Pallas kernels (interpret mode on CPU), scalar-gated GLA
  and gated delta rule, plain and packed rows, on a 2 x 4 mesh: value and every gradient of
  one loss vs the single-device recurrent op."""
  _setup()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from linjax import ops, parallel
  from linjax.parallel import sequence as sp
  B, T, H, K, V = 2, 64, 2, 16, 16
  a = _linear_inputs(B, T, H, K, V, B)
  seg = np.ones((B, T), np.int32)
  seg[0, 20:], seg[0, 40:], seg[1, 32:] = 2, 3, 4          # inside a shard, on a shard start
  seg = jnp.asarray(seg)
  mesh = parallel.make_mesh(data=2, seq=4)

  def loss(f, a, **kw):
    o1, S1 = f.gla(a["q"], a["k"], a["v"], a["gh"], initial_state=a["S0"],
                   output_final_state=True, **kw)
    o2, S2 = f.delta_rule(a["q"], a["kn"], a["v"], a["beta"], a["gh"], initial_state=a["S0"],
                          output_final_state=True, **kw)
    return jnp.sum(o1 * a["v"]) + jnp.sum(S1) + jnp.sum(o2 * a["v"]) + jnp.sum(S2 ** 2)

  for label, kw in (("plain", {}), ("packed", dict(segment_ids=seg))):
    ref = jax.jit(jax.value_and_grad(lambda a: loss(ops, a, method="recurrent", **kw)))(a)
    with parallel.use_mesh(mesh):
      got = jax.jit(jax.value_and_grad(
          lambda a: loss(sp, a, method="pallas", chunk_size=16, **kw)))(a)
    worst = rel(ref[0], got[0])
    for n in ("q", "k", "v", "gh", "beta", "S0", "kn"):
      e = rel(ref[1][n], got[1][n])
      assert e <= TOL, f"pallas {label} grad {n}: {e:.2e}"
      worst = max(worst, e)
    assert rel(ref[0], got[0]) <= TOL, (label, ref[0], got[0])
    print(f"LASP-2 on Pallas kernels, {label}: worst rel err {worst:.1e}")
  print("PALLAS OK")


def _collectives(txt):
  import re
  kinds = ("all-gather", "all-reduce", "collective-permute", "reduce-scatter", "all-to-all")
  found = {k: [] for k in kinds}
  for line in txt.splitlines():
    for k in kinds:
      m = re.search(rf"= (\S+) {k}(-start)?\(", line)
      if m:
        found[k].append(m.group(1))
  return found


def worker_attention_hlo():
  _setup()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from linjax import ops, parallel
  from linjax.parallel import sequence as sp

  B, T, Hq, Hkv, D = 2, 32, 4, 2, 8
  a = dict(q=posenc((B, T, Hq, D), 1), k=posenc((B, T, Hkv, D), 2), v=posenc((B, T, Hkv, D), 3))
  seg = jnp.asarray(np.repeat(np.array([[0] * 10 + [1] * 13 + [2] * 9]), B, 0), jnp.int32)
  cases = {"causal": {}, "segments": dict(segment_ids=seg), "window5": dict(window=5),
           "window4_sinks2": dict(window=4, num_sinks=2),
           "window6_segments": dict(window=6, segment_ids=seg),
           "window20_sink1": dict(window=20, num_sinks=1),
           "bidirectional_segments": dict(causal=False, segment_ids=seg)}
  # as the Llama mixers call it: explicit positions, restarting per packed document
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  starts = np.array([0, 10, 23])
  ppos = jnp.asarray(np.repeat((np.arange(T) - starts[np.searchsorted(starts, np.arange(T),
                                                                     "right") - 1])[None], B, 0))
  cases.update({"positions_window5": dict(window=5, q_positions=pos, kv_positions=pos),
                "positions_causal_sinks": dict(num_sinks=2, q_positions=pos, kv_positions=pos),
                "packed_window3": dict(window=3, segment_ids=seg, q_positions=ppos,
                                       kv_positions=ppos)})
  plain = [n for n in cases if "positions" not in cases[n] and "q_positions" not in cases[n]]
  do = posenc((B, T, Hq, D), 9)

  def total(f):
    def fn(a):
      outs = {n: f.attention(a["q"], a["k"], a["v"], **kw) for n, kw in cases.items()}
      return sum(jnp.sum(o * do) for o in outs.values()), outs
    return jax.jit(jax.value_and_grad(fn, has_aux=True))

  (_, ref), gref = total(ops)(a)
  for n in plain:  # the op itself against the token-by-token reference
    kw = cases[n]
    r = ops.reference.softmax_attention(a["q"], a["k"], a["v"], causal=kw.get("causal", True),
                                        window=kw.get("window"),
                                        num_sinks=kw.get("num_sinks", 0),
                                        segment_ids=kw.get("segment_ids"))
    assert rel(r, ref[n]) <= TOL, n
  for data, seq in ((4, 2), (2, 4), (1, 8)):
    mesh = parallel.make_mesh(data=data, seq=seq)
    with parallel.use_mesh(mesh):
      (_, got), ggot = total(sp)(a)
    worst = 0.0
    for n in cases:
      e = rel(ref[n], got[n])
      worst = max(worst, e)
      assert e <= TOL, f"attention {n} data={data} seq={seq}: {e:.2e}"
    for key in a:
      e = rel(gref[key], ggot[key])
      worst = max(worst, e)
      assert e <= TOL, f"attention grad {key} data={data} seq={seq}: {e:.2e}"
    print(f"attention data={data} seq={seq}: worst rel err {worst:.1e}")
  print("ATTN OK")

  # HLO: one linear layer's forward holds exactly one all-gather along seq, of a size that
  # does not depend on T; a sliding window moves only a tail (collective-permute).
  mesh = parallel.make_mesh(data=2, seq=4)
  sh = NamedSharding(mesh, P("data", "seq"))

  def packed_ids(T):  # documents of 100 tokens, as the trainer's packing makes them
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) // 100 + 1, (2, T))

  def hlo(fn, T, nargs=5):
    H, K = 2, 16
    x = jax.ShapeDtypeStruct((2, T, H, K), jnp.float32, sharding=sh)
    b = jax.ShapeDtypeStruct((2, T, H), jnp.float32, sharding=sh)
    with parallel.use_mesh(mesh):
      return jax.jit(fn).lower(x, x, x, x, b).compile().as_text()

  layers = {
      "gla_channel_gate": lambda q, k, v, g, b: sp.gla(q, k, v, g, method="chunk")[0],
      "gla_scalar_gate": lambda q, k, v, g, b: sp.gla(q, k, v, b, method="chunk")[0],
      "delta_rule": lambda q, k, v, g, b: sp.delta_rule(q, k, v, jax.nn.sigmoid(b),
                                                        method="chunk")[0],
      # packed rows: the shards' first / last segment ids ride in the same all-gather
      "gla_scalar_gate_packed": lambda q, k, v, g, b: sp.gla(
          q, k, v, b, method="chunk", segment_ids=packed_ids(q.shape[1]))[0],
      "delta_rule_packed": lambda q, k, v, g, b: sp.delta_rule(
          q, k, v, jax.nn.sigmoid(b), method="chunk", segment_ids=packed_ids(q.shape[1]))[0],
  }
  for name, fn in layers.items():
    sizes = []
    for T in (256, 512):
      c = _collectives(hlo(fn, T))
      assert len(c["all-gather"]) == 1, (name, T, c)
      assert not any(c[k] for k in c if k != "all-gather"), (name, T, c)
      sizes.append(c["all-gather"][0])
    assert sizes[0] == sizes[1], (name, sizes)
    print(f"HLO {name}: one all-gather {sizes[0]} at T=256 and T=512")
  c = _collectives(hlo(lambda q, k, v, g, b: sp.attention(q, k, v, window=8), 256))
  assert c["collective-permute"] and not c["all-gather"], c
  c2 = _collectives(hlo(lambda q, k, v, g, b: sp.attention(q, k, v), 256))
  assert len(c2["all-gather"]) == 1, c2
  print(f"HLO attention: sliding window {c['collective-permute']}, full {c2['all-gather']}")
  print("HLO OK")


def worker_llama_step():
  """One step of the trainer's own train step (linjax.train.trainer.make_train_step) on a tiny
  hybrid linearized Llama (GLA, softmax, DeltaNet, sliding-window layers), single device vs a
  data=2 x fsdp=2 x seq=2 mesh.

  What is compared is what the sharding can change: the loss and metrics, the gradients
  before the optimizer (relative error per leaf), and the parameters after the update with
  an absolute floor. The optimizer state itself is not compared leaf by leaf: Adam's first
  step divides by sqrt(v) + eps, so a 1e-9 difference in a near-zero gradient element
  (summation order under a mesh) moves that element of m / sqrt(v) by O(1), which says
  nothing about the sharding."""
  _setup()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from linjax import parallel
  from linjax.models.llama import Llama, LlamaConfig
  from linjax.parallel import sequence as sp
  from linjax.train import objectives
  from linjax.train import optim as optim_lib
  from linjax.train import trainer
  from linjax.train.config import stage

  traced = []
  orig = sp._shard_map
  sp._shard_map = lambda fn, mesh, i, o: traced.append(fn) or orig(fn, mesh, i, o)

  lc = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            mixers=("gla", "softmax", "deltanet", "sliding_window"),
            mixer_kwargs=({}, {}, {}, dict(window=8, num_sinks=0)))
  cfg = stage()
  B, T = 4, 32
  ids = np.random.RandomState(0).randint(0, 64, (B, T + 1)).astype(np.int32)
  batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
           "loss_mask": np.ones((B, T), np.float32),
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}

  # packed rows: documents of 11, 5 and 16 tokens (positions restart), one row unpacked
  seg = np.ones((B, T), np.int32)
  seg[:2, 11:16], seg[:2, 16:] = 2, 3
  seg[3, 20:] = 2
  pos_packed = np.concatenate([np.arange(11), np.arange(5), np.arange(16)]).astype(np.int32)
  packed = dict(batch, segment_ids=seg, positions=np.stack([pos_packed] * 2 + [
      np.arange(T, dtype=np.int32), np.r_[np.arange(20), np.arange(12)].astype(np.int32)]))
  objective = objectives.make_objective({"ce": 1.0})

  def one_step(mesh, batch=batch):
    model = parallel.create_sharded(
        lambda: Llama(LlamaConfig(**lc), rngs=nnx.Rngs(params=0)), mesh)
    opt = nnx.Optimizer(model, optim_lib.make_optimizer(cfg.optim), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    state_sh = parallel.param_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    bsh = parallel.batch_sharding(mesh, 2, (B, T))
    step = trainer.make_train_step(graphdef, None, None, nnx.Param, objective, accum=1,
                                   plateau=False, state_sh=state_sh,
                                   batch_sh={k: bsh for k in list(batch) + ["segment_ids"]})
    gb = parallel.host_local_to_global(batch, mesh)
    gb.setdefault("segment_ids", None)   # one document per row

    @jax.jit
    def grads(state, gb):
      model, _ = nnx.merge(graphdef, state)
      gdef, params, rest = nnx.split(model, nnx.Param, ...)
      f = lambda p: objective(nnx.merge(gdef, p, rest), None, None, gb)[0]
      return jax.grad(f)(params)

    with parallel.use_mesh(mesh):
      g = grads(state, gb)
      new_state, metrics = step(state, None, gb, jnp.asarray(0, jnp.int32),
                                jnp.asarray(cfg.optim.lr, jnp.float32))
    params = nnx.state(nnx.merge(graphdef, new_state)[0], nnx.Param)
    return jax.device_get(g), jax.device_get(params), metrics, new_state

  single = parallel.make_mesh(data=1, devices=jax.devices()[:1])
  mesh = parallel.make_mesh(data=2, fsdp=2, seq=2)
  for label, b in (("one document per row", batch), ("packed rows", packed)):
    traced.clear()
    r1 = one_step(single, b)
    assert not traced
    r2 = one_step(mesh, b)
    # every layer (GLA, softmax, DeltaNet, sliding window) takes the sequence-parallel path
    assert len(traced) >= 4, f"{label}: expected 4 sequence-parallel layers, traced {len(traced)}"
    _compare_step(label, r1, r2, len(traced), lr=float(cfg.optim.lr), cfg_eps=cfg.optim.eps,
                  cfg_clip=cfg.optim.clip_norm)
  print("LLAMA STEP OK")


def _compare_step(label, r1, r2, n_traced, lr, cfg_eps, cfg_clip):
  import jax
  import numpy as np
  g1, p1, m1, _ = r1
  g2, p2, m2, s2 = r2
  assert any("fsdp" in str(getattr(x, "sharding", "")) for x in jax.tree.leaves(s2))
  for k in m1:
    e = rel(m1[k], m2[k])
    assert e <= TOL, f"metric {k}: {m1[k]} vs {m2[k]}"
  gnorm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                            for x in jax.tree.leaves(g1))))
  worst_g = 0.0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(b).all(), path
    # relative to the leaf, with a floor of 1e-3 of the global norm for near-zero leaves
    e = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-3 * gnorm))
    worst_g = max(worst_g, e)
    assert e <= TOL, f"{label}: gradient {jax.tree_util.keystr(path)} rel err {e:.2e}"
  # Parameters after the update. Adam's first step is lr * u(g), u(g) = c g / (|c g| + eps)
  # (bias-corrected moments m = g, v = g^2; c = the global-norm clip factor): where |g| ~ eps
  # = 1e-8, a 1e-10 summation-order difference in g moves u by O(1e-2), i.e. the parameter by
  # ~lr / 100 (seen: 5.6e-6 at lr 3e-4). So each element may differ by what u makes of the
  # two runs' own (already compared) gradients, plus 1e-5 relative and 1e-8 absolute.
  eps, clip = float(cfg_eps), float(cfg_clip)
  def u(g, norm):
    c = min(1.0, clip / norm) if clip else 1.0
    return c * g / (np.abs(c * g) + eps)
  gnorm2 = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(g2))))
  worst_p = 0.0
  for (path, a), b, ga, gb in zip(jax.tree_util.tree_flatten_with_path(p1)[0],
                                  jax.tree.leaves(p2), jax.tree.leaves(g1), jax.tree.leaves(g2)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ga, gb = np.asarray(ga, np.float64), np.asarray(gb, np.float64)
    allowed = TOL * np.abs(a) + 1e-8 + 1.01 * lr * np.abs(u(ga, gnorm) - u(gb, gnorm2))
    worst_p = max(worst_p, float(np.abs(a - b).max()))
    assert (np.abs(a - b) <= allowed).all(), (
        f"{label}: parameter {jax.tree_util.keystr(path)} differs by {np.abs(a - b).max():.2e}, "
        "more than the gradient difference explains")
  print(f"llama step ({label}): loss {float(m1['loss']):.6f} vs {float(m2['loss']):.6f}, worst "
        f"gradient rel err {worst_g:.1e}, worst parameter abs diff {worst_p:.1e}, "
        f"{n_traced} shard_map layers")


if __name__ == "__main__":
  globals()["worker_" + sys.argv[1]]()
