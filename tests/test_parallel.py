"""Mesh, logical rules and sharded model creation on 8 fake CPU devices.

Each test runs its checks in one subprocess that sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(path, name, timeout=600):
  from tests.helpers import subprocess_env
  env = subprocess_env(8)
  r = subprocess.run([sys.executable, path, name], env=env, cwd=ROOT, capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, f"worker {name} failed:\n{r.stdout[-6000:]}\n{r.stderr[-8000:]}"
  return r.stdout


def test_mesh_rules_and_sharded_creation():
  out = run_worker(__file__, "basics")
  assert "BASICS OK" in out, out


# ---------------------------------------------------------------- worker (subprocess) ---

def worker_basics():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  from linjax import parallel

  assert jax.device_count() == 8
  # make_mesh: defaults, -1, ConfigDict, errors
  m = parallel.make_mesh({"data": 2, "seq": -1})
  assert m.axis_names == ("data", "fsdp", "tensor", "seq")
  assert dict(m.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "seq": 4}
  assert dict(parallel.make_mesh().shape)["data"] == 8
  import ml_collections
  cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 2, "tensor": 2, "seq": 2})
  assert dict(parallel.make_mesh(cfg).shape) == {"data": 1, "fsdp": 2, "tensor": 2, "seq": 2}
  for bad in ({"data": 3}, {"data": -1, "seq": -1}, {"data": 3, "seq": -1}, {"pipe": 2}):
    try:
      parallel.make_mesh(bad)
    except ValueError as e:
      assert str(e)
    else:
      raise AssertionError(f"no error for {bad}")

  # logical rules
  m3 = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  L = parallel.logical_to_spec
  assert L(("embed", "heads"), (8, 12), m3) == P("fsdp", "tensor")
  assert L(("vocab", "embed"), (16, 8), m3) == P("tensor", "fsdp")
  assert L(("batch", "seq", "embed"), (4, 8, 8), m3) == P(("data", "fsdp"), None, None)
  assert L(("embed", "heads"), (8, 9), m3) == P("fsdp", None)  # 9 % 2: replicated
  assert L(("norm",), (8,), m3) == P(None)
  m4 = parallel.make_mesh(data=2, seq=4)
  assert parallel.batch_sharding(m4).spec == P("data", "seq")

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.emb = nnx.Embed(16, 8, embedding_init=nnx.with_partitioning(init, ("vocab", "embed")),
                           rngs=rngs)
      self.q = nnx.Linear(8, 12, kernel_init=nnx.with_partitioning(init, ("embed", "heads")),
                          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                          ("heads",)), rngs=rngs)
      self.norm = nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))(
          rngs.params(), (8,)))

    def __call__(self, ids):
      return self.q(self.emb(ids) * self.norm[...])

  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  model = parallel.create_sharded(lambda: Tiny(nnx.Rngs(0)), mesh)
  st = nnx.state(model)
  assert st["emb"]["embedding"][...].sharding.spec == P("tensor", "fsdp")
  assert st["q"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
  assert st["q"]["bias"][...].sharding.spec == P("tensor")
  # each device holds only its shard (no full copy)
  shard_shapes = {s.data.shape for s in st["q"]["kernel"][...].addressable_shards}
  assert shard_shapes == {(4, 6)}, shard_shapes
  with nnx.use_eager_sharding(False):
    ref = Tiny(nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(ref.q.kernel[...]), np.asarray(model.q.kernel[...]))
  # param_shardings matches the state structure and jit accepts it
  shardings = parallel.param_shardings(model, mesh)
  ids = jnp.arange(16).reshape(4, 4) % 16
  ids = jax.device_put(ids, parallel.batch_sharding(mesh))
  y = nnx.jit(lambda m, x: m(x))(model, ids)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref(jnp.arange(16).reshape(4, 4) % 16)),
                             rtol=1e-6, atol=1e-6)
  assert jax.tree.structure(shardings) == jax.tree.structure(parallel.param_specs(model, mesh))
  # creating a model inside use_mesh shards it eagerly by the same rules
  with parallel.use_mesh(mesh):
    assert parallel.current_mesh() is mesh
    eager = Tiny(nnx.Rngs(0))
  assert eager.q.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert parallel.current_mesh() is None
  assert parallel.initialize() is False
  assert parallel.process_batch_slice(8) == slice(0, 8)
  gb = parallel.host_local_to_global({"ids": np.arange(64).reshape(4, 16), "seg": None}, m4)
  assert gb["seg"] is None and gb["ids"].sharding.spec == P("data", "seq")
  np.testing.assert_array_equal(np.asarray(gb["ids"]), np.arange(64).reshape(4, 16))
  print("BASICS OK")


if __name__ == "__main__":
  globals()["worker_" + sys.argv[1]]()
