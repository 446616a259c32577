"""Multi-host start-up and per-host data: plain `jax.distributed`, nothing home-made.

On a TPU pod slice or a Slurm / Open MPI GPU cluster, `initialize()` with no arguments lets
JAX discover the coordinator, the process count and this process's id from the
environment; elsewhere pass them (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). With one process it does nothing, so the same script runs on a laptop.
See experiments/tpu_pod_launch.sh and experiments/gpu_multinode.md.
"""
from __future__ import annotations

import os

import jax
import numpy as np

_INITIALIZED = False


def _env_int(name):
  v = os.environ.get(name)
  return None if v in (None, "") else int(v)


def _cluster_detected() -> bool:
  """A multi-process launch JAX can auto-configure (Slurm, Open MPI, TPU pod, multislice)."""
  env = os.environ
  if env.get("LINJAX_DISTRIBUTED") == "1":
    return True
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, **kwargs) -> bool:
  """`jax.distributed.initialize` when running multi-process; a no-op for one process.

  Returns True when the distributed runtime was started (now or earlier).
  """
  global _INITIALIZED
  if _INITIALIZED:
    return True
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if not explicit and not _cluster_detected():
    return False  # single process: nothing to do
  if num_processes == 1:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids, **kwargs)
  _INITIALIZED = True
  return True


def process_batch_slice(global_batch_size: int) -> slice:
  """Rows of the global batch this host loads (hosts split the batch evenly, in order)."""
  n, i = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {n} processes")
  per = global_batch_size // n
  return slice(i * per, (i + 1) * per)


def host_local_to_global(batch, mesh, spec_fn=None, *, local: bool = False):
  """numpy batches -> global `jax.Array`s sharded like `rules.batch_sharding`.

  local=False (what `linjax.train` does): every host holds the same full global batch (same
  data, same seed) and materialises only the shards its own devices hold
  (`jax.make_array_from_callback`). local=True: each host passes only its own rows (see
  `process_batch_slice`), assembled with `multihost_utils.host_local_array_to_global_array`.
  Single process: both are a sharded `device_put`.
  """
  from jax.sharding import NamedSharding

  from linjax.parallel.rules import batch_spec

  def spec_of(x, shape):
    return spec_fn(x) if spec_fn is not None else batch_spec(mesh, x.ndim, shape)

  def one(x):
    if x is None:
      return None
    x = np.asarray(x)
    if local and jax.process_count() > 1:
      from jax.experimental import multihost_utils
      shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
      return multihost_utils.host_local_array_to_global_array(x, mesh, spec_of(x, shape))
    sharding = NamedSharding(mesh, spec_of(x, x.shape))
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(one, batch, is_leaf=lambda x: x is None)
