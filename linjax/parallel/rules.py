"""Logical axis names -> mesh axes, and shardings for parameters, batches and new models.

Every parameter names its logical axes with `nnx.with_partitioning(init, ("embed", "heads"))`
(the names are the left-hand sides of `DEFAULT_RULES` below). `DEFAULT_RULES` maps them onto the mesh
axes of `linjax.parallel.mesh` (MaxText's `logical_axis_rules`, big_vision's
`sharding_rules`):

  embed -> fsdp         (parameters: ZeRO-3 style sharding of the model dimension)
  vocab, heads, kv_heads, mlp -> tensor   (Megatron-style tensor parallelism)
  batch -> (data, fsdp) (activations)     seq -> seq (activations: sequence parallelism)
  norm, heads_small, head_dim, mlp_rank, mlp_blocks, ... -> replicated

A mesh axis is used at most once per array (the first logical axis that asks for it wins:
activations ("batch", "seq", "embed") -> (("data", "fsdp"), "seq", None)), and a dimension
that the mesh axes do not divide evenly stays replicated (9 heads on tensor=2).
"""
from __future__ import annotations

import functools
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", "seq"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("heads_small", None),
    ("head_dim", None),
    ("kv", None),
    ("layers", None),
    ("lora", None),
    ("mlp_rank", None),     # the inner dimension of a low-rank FFN factor (structured_mlp)
    ("mlp_blocks", None),   # the block axis of a block-diagonal FFN factor
)

BATCH_AXES = ("data", "fsdp")


def _as_tuple(x):
  if x is None:
    return ()
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def logical_to_spec(names, shape=None, mesh=None, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for logical axis `names` (None entries stay replicated).

  With `mesh` and `shape`, mesh axes of size 1 are dropped and a dimension not divisible by
  its mesh axes' product is replicated. Names not in `rules` that are mesh axis names map
  to themselves; other unknown names are replicated.
  """
  table = dict(rules)
  sizes = dict(mesh.shape) if mesh is not None else {}
  used: set = set()
  out = []
  for i, name in enumerate(_as_tuple(names) if not isinstance(names, P) else tuple(names)):
    if name is None:
      out.append(None)
      continue
    if isinstance(name, (tuple, list)):  # already mesh axes, or several logical names
      axes = tuple(a for n in name for a in _as_tuple(table.get(n, n)))
    elif name in table:
      axes = _as_tuple(table[name])
    elif mesh is None or name in sizes:
      axes = (name,)
    else:
      axes = ()
    axes = tuple(a for a in axes if a not in used and (mesh is None or a in sizes))
    if mesh is not None:
      axes = tuple(a for a in axes if sizes[a] > 1)
      if shape is not None and axes and shape[i] % math.prod(sizes[a] for a in axes):
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _var_names(v):
  md = v.get_metadata()
  names = md.get("out_sharding") or md.get("sharding") or md.get("sharding_names")
  return names


def param_specs(tree, mesh=None, rules=DEFAULT_RULES):
  """PartitionSpec per Variable of an nnx Module / State (abstract or concrete)."""
  from flax import nnx
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)

  def f(x):
    if isinstance(x, nnx.Variable):
      names = _var_names(x)
      shape = getattr(x.get_value() if hasattr(x, "get_value") else x.value, "shape", None)
      spec = P() if not names else logical_to_spec(names, shape, mesh, rules)
      return x.replace(spec)
    return P() if hasattr(x, "shape") else None

  return jax.tree.map(f, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(tree, mesh, rules=DEFAULT_RULES):
  """NamedSharding per Variable of an nnx Module / State, same structure as `nnx.state`."""
  from flax import nnx
  specs = param_specs(tree, mesh, rules)
  return jax.tree.map(
      lambda s: s.replace(NamedSharding(mesh, s.get_value() if hasattr(s, "get_value") else s.value))
      if isinstance(s, nnx.Variable) else NamedSharding(mesh, s),
      specs, is_leaf=lambda x: isinstance(x, (nnx.Variable, P)))


def batch_spec(mesh=None, ndim: int = 2, shape=None) -> P:
  """[B, T, ...] activations / token batches: B over (data, fsdp), T over seq."""
  names = ("batch", "seq") + (None,) * (ndim - 2)
  return logical_to_spec(names[:ndim], shape, mesh)


def batch_sharding(mesh, ndim: int = 2, shape=None) -> NamedSharding:
  """NamedSharding for a [B, T, ...] batch: B over (data, fsdp), T over seq."""
  return NamedSharding(mesh, batch_spec(mesh, ndim, shape))


def shard_batch(batch, mesh):
  """`device_put` every [B, T, ...] array of a pytree with `batch_sharding` (single host)."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim, x.shape))
                      if getattr(x, "ndim", 0) >= 1 else x, batch)


def with_logical_constraint(x, names, mesh=None, rules=DEFAULT_RULES):
  """`with_sharding_constraint` by logical names; a no-op without an active mesh."""
  from linjax.parallel.mesh import current_mesh
  mesh = current_mesh() if mesh is None else mesh
  if mesh is None:
    return x
  spec = logical_to_spec(names, x.shape, mesh, rules)
  if isinstance(mesh, jax.sharding.Mesh):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, spec)


def create_sharded(model_ctor, mesh, rules=DEFAULT_RULES):
  """Build `model_ctor()` (an nnx Module) with every parameter born sharded.

  The constructor runs once abstractly (`nnx.eval_shape`) to read the logical axes, then
  under `jax.jit` with `out_shardings` from `param_shardings`, so each device only ever
  materialises its own shards (the Flax NNX sharding guide's pattern). Returns the module.
  """
  from flax import nnx

  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(model_ctor)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    with nnx.use_eager_sharding(False):
      return nnx.state(model_ctor())

  state = init()
  return nnx.merge(graphdef, state)
