"""Sharding and sequence parallelism on JAX's own engine (meshes, shard_map, jax.distributed).

  from linjax import parallel
  parallel.initialize()                                   # multi-host; no-op on one process
  mesh = parallel.make_mesh({"data": 2, "seq": 4})
  model = parallel.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  with parallel.use_mesh(mesh):                           # mixers run LASP-2 / LASP-2H
    loss, grads = train_step(model, parallel.shard_batch(batch, mesh))
"""
from linjax.parallel.distributed import host_local_to_global, initialize, process_batch_slice
from linjax.parallel.mesh import AXES, axis_size, current_mesh, make_mesh, mesh_shape, use_mesh
from linjax.parallel.rules import (DEFAULT_RULES, batch_sharding, batch_spec, create_sharded,
                                   logical_to_spec, param_shardings, param_specs, shard_batch,
                                   with_logical_constraint)

__all__ = [
    "AXES", "DEFAULT_RULES", "axis_size", "batch_sharding", "batch_spec", "create_sharded",
    "current_mesh", "host_local_to_global", "initialize", "logical_to_spec", "make_mesh",
    "mesh_shape", "param_shardings", "param_specs", "process_batch_slice", "sequence",
    "shard_batch", "use_mesh", "with_logical_constraint",
]


def __getattr__(name):
  if name == "sequence":
    import importlib
    return importlib.import_module("linjax.parallel.sequence")
  raise AttributeError(f"module 'linjax.parallel' has no attribute {name!r}")
