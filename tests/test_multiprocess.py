"""Two real processes on localhost (`jax.distributed` over gloo, 4 CPU devices each), started
the way experiments/gpu_multinode.md starts a cluster without a scheduler: every process
gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID and calls
`linjax.parallel.initialize()` (what `python -m linjax.train` does first).

Checked against one process (8 devices in it, and 1 device):
  * a LASP-2 layer (`linjax.parallel.sequence.gla`, per-channel gates, an initial state)
    over a `seq` axis of 8 shards, 4 in each process: outputs, final state, every gradient;
  * one step of the trainer's own train step (`linjax.train.trainer.make_train_step`) on a
    tiny hybrid Llama (a GLA layer: LASP-2, a sliding window with sinks: LASP-2H) on packed
    rows, on a data=2 x fsdp=2 x seq=2 mesh spanning both processes: loss, gradients before
    the optimizer, parameters after;
  * the checkpoint both processes wrote (`linjax.train.checkpoints.Checkpointer`) restores in
    one process, its checksums verified, to the parameters of the 2-process step.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices, **extra):
  from tests.helpers import subprocess_env
  env = subprocess_env(devices)
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  env.update(extra)
  return env


def test_two_processes_equal_one_process(tmp_path):
  """The two processes and the one-process reference run at the same time (the reference
  waits for the 2-process results before comparing)."""
  out = str(tmp_path)
  addr = f"127.0.0.1:{_free_port()}"
  names = ["process 0", "process 1", "single process"]
  logs = [open(os.path.join(out, f"log{i}.txt"), "w+") for i in range(3)]
  envs = [_env(4, JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
          for i in range(2)] + [_env(8)]
  procs = [subprocess.Popen([sys.executable, __file__, "distributed" if i < 2 else "single",
                             out], cwd=ROOT, stdout=logs[i], stderr=subprocess.STDOUT,
                            env=envs[i]) for i in range(3)]
  deadline = time.time() + 600
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  for name, p, t in zip(names, procs, texts):
    assert p.returncode == 0, f"{name} failed (rc {p.returncode}):\n{t[-6000:]}"
  assert "PROCESS 0 OF 2 DONE" in texts[0] and "PROCESS 1 OF 2 DONE" in texts[1]
  assert "MULTIPROCESS OK" in texts[2], texts[2][-3000:]
  print(*(l for t in texts for l in t.splitlines() if l.startswith("[")), sep="\n")


# ---------------------------------------------------------------- the shared computations

def _lasp2_inputs():
  import numpy as np
  from tests.test_sequence_parallel import posenc
  B, T, H, K, V = 2, 64, 2, 8, 6
  sp = lambda x: np.log1p(np.exp(x))
  a = {"q": posenc((B, T, H, K), 1, .5), "k": posenc((B, T, H, K), 2, .5),
       "v": posenc((B, T, H, V), 3), "g": -0.3 * sp(np.asarray(posenc((B, T, H, K), 5))),
       "S0": posenc((B, H, K, V), 7)}
  a = {k: np.asarray(x, np.float32) for k, x in a.items()}
  do, dS = (np.asarray(posenc((B, T, H, V), 11)), np.asarray(posenc((B, H, K, V), 12)))
  return a, do, dS


def _lasp2_program(f, do, dS):
  import jax
  import jax.numpy as jnp

  def loss(a):
    o, S = f.gla(a["q"], a["k"], a["v"], a["g"], initial_state=a["S0"],
                 output_final_state=True, method="chunk", chunk_size=4)
    return jnp.sum(o * do) + jnp.sum(S * dS), (o, S)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
             mixers=("gla", "sliding_window"), mixer_kwargs=({}, dict(window=8, num_sinks=2)))
LR = 1e-3


def _batch():
  import numpy as np
  B, T = 4, 32
  ids = np.random.RandomState(0).randint(0, 64, (B, T + 1)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  seg[:2, 11:16], seg[:2, 16:] = 2, 3
  pos = np.stack([np.r_[np.arange(11), np.arange(5), np.arange(16)]] * 2 +
                 [np.arange(T), np.r_[np.arange(20), np.arange(12)]]).astype(np.int32)
  seg[3, 20:] = 2
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
          "loss_mask": np.ones((B, T), np.float32), "positions": pos, "segment_ids": seg}


def _train_step(mesh):
  """One step of the trainer's train step on `mesh`: (grads before the optimizer, params
  after, metrics, model, optimizer) with the arrays still global."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from linjax import parallel
  from linjax.models.llama import Llama, LlamaConfig
  from linjax.train import objectives as obj_lib
  from linjax.train import optim as optim_lib
  from linjax.train import trainer
  from linjax.train.config import optim_config

  batch = _batch()
  B, T = batch["input_ids"].shape
  model = parallel.create_sharded(lambda: Llama(LlamaConfig(**LLAMA), rngs=nnx.Rngs(params=0)),
                                  mesh)
  ocfg = optim_config()
  ocfg.lr = LR
  opt = nnx.Optimizer(model, optim_lib.make_optimizer(ocfg), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  state_sh = parallel.param_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  bsh = parallel.batch_sharding(mesh, 2, (B, T))
  objective = obj_lib.make_objective({"ce": 1.0})
  step = trainer.make_train_step(graphdef, None, None, nnx.Param, objective, accum=1,
                                 plateau=False, state_sh=state_sh,
                                 batch_sh={k: bsh for k in batch})
  gb = parallel.host_local_to_global(batch, mesh)

  @jax.jit
  def grads(state, gb):
    model, _ = nnx.merge(graphdef, state)
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    return jax.grad(lambda p: objective(nnx.merge(gdef, p, rest), None, None, gb)[0])(params)

  with parallel.use_mesh(mesh):
    g = grads(state, gb)
    new_state, metrics = step(state, None, gb, jnp.asarray(0, jnp.int32),
                              jnp.asarray(LR, jnp.float32))
  model, opt = nnx.merge(graphdef, new_state)
  return g, nnx.state(model, nnx.Param), metrics, model, opt


def _host(tree):
  """Global (possibly multi-process) arrays -> full numpy arrays on every process."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                      tree)


def _flat(tree):
  import jax
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------- worker: 2 processes

def worker_distributed(out):
  import jax
  import numpy as np
  from flax import nnx

  from linjax import parallel
  from linjax.parallel import sequence as sp
  from linjax.train.checkpoints import Checkpointer

  t0 = time.time()
  assert parallel.initialize() is True            # the launcher path: env vars only
  pid = jax.process_index()
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  jax.config.update("jax_default_matmul_precision", "highest")

  # LASP-2 over seq = 8 shards: devices 0-3 in process 0, 4-7 in process 1
  mesh = parallel.make_mesh(data=1, seq=8)
  owners = {d.process_index for d in mesh.devices.reshape(-1)}
  assert owners == {0, 1}, owners
  a, do, dS = _lasp2_inputs()
  with parallel.use_mesh(mesh):
    (_, (o, S)), g = _lasp2_program(sp, do, dS)(a)
  res = {"o": o, "S": S, **{f"grad_{k}": v for k, v in g.items()}}
  res = _host(res)
  print(f"[{time.time() - t0:.0f}s] LASP-2 done", flush=True)

  # one trainer step on data=2 x fsdp=2 x seq=2, every axis crossing the processes somewhere
  mesh = parallel.make_mesh(data=2, fsdp=2, seq=2)
  grads, params, metrics, model, opt = _train_step(mesh)
  step = {f"grad{k}": v for k, v in _flat(_host(grads)).items()}
  step.update({f"param{k}": v for k, v in _flat(_host(params)).items()})
  step.update({f"metric_{k}": np.asarray(v.addressable_data(0)) for k, v in metrics.items()})
  print(f"[{time.time() - t0:.0f}s] train step done", flush=True)
  ck = Checkpointer(os.path.join(out, "ckpt"), async_save=False)
  ck.save(1, nnx.state(model), nnx.state(opt), {"step": 1, "processes": 2})
  ck.close()
  if pid == 0:
    np.savez(os.path.join(out, "lasp2.npz"), **res)
    np.savez(os.path.join(out, "step.npz"), **step)
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("written")
  if pid == 0:
    open(os.path.join(out, "done"), "w").close()
  print(f"[{time.time() - t0:.0f}s] PROCESS {pid} OF 2 DONE", flush=True)


# ---------------------------------------------------------------- worker: 1 process

def _check(label, ref, got, tol=TOL):
  from tests.test_sequence_parallel import rel
  e = rel(ref, got)
  assert e <= tol, f"{label}: rel err {e:.2e} > {tol:.0e}"
  return e


def worker_single(out):
  import jax
  import numpy as np
  from flax import nnx

  from linjax import ops, parallel
  from linjax.parallel import sequence as sp
  from linjax.train.checkpoints import Checkpointer

  t0 = time.time()
  assert jax.process_count() == 1 and jax.device_count() == 8
  jax.config.update("jax_default_matmul_precision", "highest")
  a, do, dS = _lasp2_inputs()
  (_, (o1, S1)), g1 = _lasp2_program(ops, do, dS)(a)              # one device, no LASP-2
  with parallel.use_mesh(parallel.make_mesh(data=1, seq=8)):
    (_, (o8, S8)), g8 = _lasp2_program(sp, do, dS)(a)             # the same mesh, 1 process
  single = parallel.make_mesh(data=1, devices=jax.devices()[:1])
  g1s, p1, m1, model1, opt1 = _train_step(single)
  print(f"[{time.time() - t0:.0f}s] single-process references done", flush=True)
  while not os.path.exists(os.path.join(out, "done")):           # the 2-process results
    assert time.time() - t0 < 540, "the 2-process run wrote no results"
    time.sleep(0.5)
  two = dict(np.load(os.path.join(out, "lasp2.npz")))
  worst = 0.0
  for name, ref1, ref8 in [("o", o1, o8), ("S", S1, S8)] + [
      (f"grad_{k}", g1[k], g8[k]) for k in a]:
    worst = max(worst, _check(f"lasp2 {name} vs 1 device", ref1, two[name]),
                _check(f"lasp2 {name} vs 8 devices in 1 process", ref8, two[name], 1e-6))
  print(f"[{time.time() - t0:.0f}s] LASP-2 over 2 processes: worst rel err {worst:.1e}")

  step2 = dict(np.load(os.path.join(out, "step.npz")))
  gp = {f"grad{k}": v for k, v in _flat(_host(g1s)).items()}
  assert {k for k in step2 if k.startswith("grad")} == set(gp)
  keys = sorted(gp)
  # _compare_step wants (grads, params, metrics, state) with matching tree leaves: flat dicts
  g2 = {k: step2[k] for k in keys}
  pk = sorted(k for k in step2 if k.startswith("param"))
  p1f = {f"param{k}": v for k, v in _flat(_host(p1)).items()}
  m2 = {k[len("metric_"):]: step2[k] for k in step2 if k.startswith("metric_")}
  r1 = ({k: gp[k] for k in keys}, {k: p1f[k] for k in pk}, _host(m1), None)
  r2 = (g2, {k: step2[k] for k in pk}, m2, None)
  _compare_step_flat(r1, r2)
  print(f"[{time.time() - t0:.0f}s] train step compared", flush=True)

  # the 2-process checkpoint restores here (checksums verified) to the 2-process parameters
  ck = Checkpointer(os.path.join(out, "ckpt"), async_save=False)
  assert ck.all_steps() == [1]
  ms, os_, meta = ck.restore(1, nnx.state(model1), nnx.state(opt1))
  assert meta == {"step": 1, "processes": 2}
  nnx.update(model1, ms)
  got = {f"param{k}": v for k, v in _flat(_host(nnx.state(model1, nnx.Param))).items()}
  for k in pk:
    np.testing.assert_array_equal(got[k], step2[k], err_msg=k)
  assert ck.verify(1) is None
  ck.close()
  print(f"[{time.time() - t0:.0f}s] MULTIPROCESS OK")


def _compare_step_flat(r1, r2):
  """What test_sequence_parallel._compare_step compares, on host copies (flat dicts)."""
  import numpy as np
  from linjax.train.config import optim_config
  clip = float(optim_config().clip_norm)
  g1, p1, m1, _ = r1
  g2, p2, m2, _ = r2
  for k in m1:
    assert abs(float(m1[k]) - float(m2[k])) <= TOL * max(abs(float(m1[k])), 1e-6), (
        k, m1[k], m2[k])
  gnorm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in g1.values())))
  worst_g = 0.0
  for k in g1:
    a, b = np.asarray(g1[k], np.float64), np.asarray(g2[k], np.float64)
    e = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-3 * gnorm))
    worst_g = max(worst_g, e)
    assert e <= TOL, f"gradient {k}: rel err {e:.2e}"
  # parameters after the step: within what Adam's first step makes of the gradient
  # differences (see test_sequence_parallel._compare_step), else 1e-5 relative
  eps = float(__import__("linjax.train.config", fromlist=["x"]).optim_config().eps)
  norms = [float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in g.values())))
           for g in (g1, g2)]

  def u(g, norm):
    c = min(1.0, clip / norm) if clip else 1.0
    return c * g / (np.abs(c * g) + eps)
  worst_p = 0.0
  for pk, gk in zip(sorted(p1), sorted(g1)):
    a, b = np.asarray(p1[pk], np.float64), np.asarray(p2[pk], np.float64)
    ga, gb = np.asarray(g1[gk], np.float64), np.asarray(g2[gk], np.float64)
    assert pk[len("param"):] == gk[len("grad"):], (pk, gk)
    allowed = TOL * np.abs(a) + 1e-8 + 1.01 * LR * np.abs(u(ga, norms[0]) - u(gb, norms[1]))
    worst_p = max(worst_p, float(np.abs(a - b).max()))
    assert (np.abs(a - b) <= allowed).all(), f"parameter {pk} differs by {np.abs(a - b).max():.2e}"
  print(f"train step over 2 processes vs 1 device: loss {float(m1['loss']):.6f} vs "
        f"{float(m2['loss']):.6f}, worst gradient rel err {worst_g:.1e}, worst parameter "
        f"diff {worst_p:.1e}")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  {"distributed": worker_distributed, "single": worker_single}[sys.argv[1]](sys.argv[2])
