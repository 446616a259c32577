"""The device mesh: axes `data`, `fsdp`, `tensor`, `seq`, and the active-mesh context.

  mesh = make_mesh({"data": 2, "seq": 4})          # 8 devices; fsdp = tensor = 1
  mesh = make_mesh(config.mesh)                     # ml_collections ConfigDict works too
  with use_mesh(mesh):                              # sequence-parallel wrappers see it
    loss = train_step(state, batch)

Sizes: every axis defaults to 1; one axis may be -1 (the rest of the devices). With no
sizes at all, `data` takes every device. The product must equal the number of devices.
Axes are `AxisType.Auto` so ordinary `jit` code runs unchanged under the mesh.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor", "seq")


def _sizes_from(cfg, overrides) -> dict:
  sizes = {}
  if cfg is not None:
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
      cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
      cfg = {a: getattr(cfg, a) for a in AXES if hasattr(cfg, a)}
    sizes.update(cfg)
  sizes.update(overrides)
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {AXES}")
  return {a: int(sizes[a]) if sizes.get(a) is not None else 1 for a in AXES} if sizes else {
      "data": -1, "fsdp": 1, "tensor": 1, "seq": 1}


def mesh_shape(cfg=None, num_devices: int | None = None, **sizes) -> dict:
  """Resolve the axis sizes (filling a -1) for `num_devices` devices; raises on mismatch."""
  n = jax.device_count() if num_devices is None else num_devices
  s = _sizes_from(cfg, sizes)
  free = [a for a in AXES if s[a] == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free} in {s}")
  if any(v < 1 and v != -1 for v in s.values()):
    raise ValueError(f"mesh axis sizes must be positive (or one -1), got {s}")
  known = math.prod(v for v in s.values() if v != -1)
  if free:
    if n % known:
      raise ValueError(f"mesh {s}: {n} devices are not divisible by the fixed axes' product "
                       f"{known}")
    s[free[0]] = n // known
  if math.prod(s.values()) != n:
    raise ValueError(f"mesh {s} has {math.prod(s.values())} devices but {n} are available "
                     f"(data*fsdp*tensor*seq must equal the device count; use -1 for one axis)")
  return s


def make_mesh(cfg=None, *, devices=None, **sizes) -> Mesh:
  """A `jax.sharding.Mesh` with axes ("data", "fsdp", "tensor", "seq").

  cfg: dict / ConfigDict / object with any of the four sizes (missing ones are 1);
  keyword sizes override it. `devices` defaults to all (global) devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  s = mesh_shape(cfg, len(devices), **sizes)
  shape = tuple(s[a] for a in AXES)
  try:
    from jax.experimental import mesh_utils
    dev = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # odd topologies: plain row-major order is always valid
    dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, AXES, axis_types=(AxisType.Auto,) * len(AXES))


# --- the active mesh --------------------------------------------------------------------

class _Active(threading.local):
  def __init__(self):
    self.stack = []


_ACTIVE = _Active()


def current_mesh():
  """The mesh set by `use_mesh` (or `jax.set_mesh`), or None."""
  if _ACTIVE.stack:
    return _ACTIVE.stack[-1]
  m = jax.sharding.get_abstract_mesh()
  return None if m is None or m.empty else m


def axis_size(mesh, name: str) -> int:
  if mesh is None or name not in mesh.axis_names:
    return 1
  return int(dict(mesh.shape)[name])


@contextlib.contextmanager
def use_mesh(mesh, rules=None):
  """Make `mesh` the active mesh: `jax.set_mesh(mesh)` plus the logical axis rules.

  Inside, `linjax.parallel.sequence` runs LASP-2 / LASP-2H when the `seq` axis is > 1,
  `jax.shard_map` and bare `PartitionSpec`s use this mesh, and Flax variables created with
  `nnx.with_partitioning` are sharded by `rules` (default `rules.DEFAULT_RULES`).
  """
  from flax import nnx

  from linjax.parallel.rules import DEFAULT_RULES
  rules = DEFAULT_RULES if rules is None else rules
  _ACTIVE.stack.append(mesh)
  try:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      yield mesh
  finally:
    _ACTIVE.stack.pop()
