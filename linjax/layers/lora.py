"""LoRA: low-rank adapters on chosen linear projections of any nnx model, built on Flax's
`nnx.LoRA`.

  apply_lora(model, rank=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj"), rngs=...)
      replaces every attribute named in `targets` that is an `nnx.Linear` (or any module
      with a 2-D `kernel` param) by a `LoRALinear` wrapping it:
          y = base(x) + (alpha / rank) * lora(dropout(x)),   lora(h) = h @ lora_a @ lora_b
      `lora` is an `nnx.LoRA` (no base module): `lora_a` [in, rank] (random, 1/sqrt(in)
      scaled), `lora_b` [rank, out] (zeros), so the model is unchanged until trained. Both
      are `linjax.layers.params.LoRAParam` (a subclass of `nnx.LoRAParam`), so
      `nnx.Optimizer(model, tx, wrt=LoRAParam)` (or `wrt=nnx.LoRAParam`) trains only them.
      A target like "self_attn.q_proj" matches by path suffix. Paths: the base weights stay
      at `<proj>/base/kernel`, the adapters are `<proj>/lora/lora_a` / `lora_b` (the layout
      of `nnx.LoRALinear`).
  merge_lora(model)   folds every adapter into its base kernel and puts the base module back:
      the model has its original structure (and parameter paths) again.
  save_lora(model, path) / load_lora(model, path)
      the adapters alone: a safetensors file of the LoRAParams (keys are their paths) plus
      `lora_config.json` (rank, alpha, dropout, the wrapped paths); `load_lora` applies LoRA
      first if the model has none.

Sharding: `lora_a` takes the base kernel's input logical axis, `lora_b` its output axis; the
rank axis is replicated (set through `nnx.LoRA`'s `a_metadata` / `b_metadata`).

Why a wrapper around `nnx.LoRA` and not `nnx.LoRALinear` itself: NNX's LoRA has no
alpha / rank scale (PEFT's `lora_alpha`, which `save_peft_adapter` exports) and no dropout
on the adapter's input, and `nnx.LoRALinear` is a new `nnx.Linear` (it cannot wrap the
structured FFN factors or keep the base projection's own parameters and metadata in place),
while `merge_lora` must give back the model's original modules and paths and attention
transfer reads the teacher's weights as `<proj>.base`. So the adapter math and parameters
are `nnx.LoRA`'s; the wrapper adds the scale, the dropout and the base module.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linjax.layers.params import LoRAParam


def _axes(kernel) -> tuple:
  meta = kernel.get_metadata() if hasattr(kernel, "get_metadata") else {}
  names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
  return tuple(names) if names else (None, None)


def _a_init(key, shape, dtype):
  """lora_a's init: normal / sqrt(in), drawn in float32."""
  return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(shape[0])).astype(dtype)


class LoRALinear(nnx.Module):
  """`base(x) + scale * lora(dropout(x))` with `lora` an `nnx.LoRA`; `base` keeps its own
  parameters."""

  def __init__(self, base: nnx.Module, *, rank: int, alpha: float, dropout: float = 0.0,
               rngs: nnx.Rngs):
    kernel = base.kernel
    if kernel.ndim != 2:
      raise ValueError(f"LoRA needs a 2-D kernel, got shape {kernel.shape}")
    d_in, d_out = kernel.shape
    in_ax, out_ax = _axes(kernel)
    dtype = kernel.dtype
    self.base = base
    self.rank, self.alpha = int(rank), float(alpha)
    self.scale = float(alpha) / float(rank)
    self.lora = nnx.LoRA(
        d_in, int(rank), d_out, dtype=dtype, param_dtype=dtype, a_initializer=_a_init,
        b_initializer=nnx.initializers.zeros_init(), lora_param_type=LoRAParam, rngs=rngs,
        a_metadata={"out_sharding": (in_ax, None), "eager_sharding": False},
        b_metadata={"out_sharding": (None, out_ax), "eager_sharding": False})
    self.dropout_rate = float(dropout)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  @property
  def lora_a(self):
    return self.lora.lora_a

  @property
  def lora_b(self):
    return self.lora.lora_b

  def __call__(self, x):
    y = self.base(x)
    h = self.dropout(x) if self.dropout is not None else x
    return y + (self.scale * self.lora(h)).astype(y.dtype)

  def delta(self):
    """The dense update `scale * lora_a @ lora_b` [in, out] in float32."""
    return self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))


def _match(path: tuple, targets) -> bool:
  dotted = ".".join(str(p) for p in path)
  for t in targets:
    if dotted == t or dotted.endswith("." + t):
      return True
  return False


def _children(module):
  """(path step, child module, setter) for the submodules of `module`, lists included."""
  if isinstance(module, (list, nnx.List)):
    for i, v in enumerate(module):
      if isinstance(v, nnx.Module):
        def _set(new, lst=module, j=i):
          lst[j] = new
        yield (i,), v, _set
    return
  for name, value in list(vars(module).items()):
    if name.startswith("_"):
      continue
    if isinstance(value, (nnx.Module, list)):
      yield (name,), value, (lambda new, n=name: setattr(module, n, new))


def _walk(module, prefix=()):
  for sub, child, setter in _children(module):
    path = prefix + sub
    if isinstance(child, nnx.Module):
      yield path, child, setter
    yield from _walk(child, path)


def apply_lora(model, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets=("q_proj", "k_proj", "v_proj", "o_proj"), rngs: nnx.Rngs | None = None):
  """Wraps the target projections in place; returns the model and the wrapped paths."""
  if isinstance(targets, str):
    targets = (targets,)
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  done = []
  for path, child, setter in list(_walk(model)):
    if isinstance(child, LoRALinear) or not _match(path, targets):
      continue
    if not isinstance(getattr(child, "kernel", None), nnx.Variable):
      continue
    setter(LoRALinear(child, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs))
    done.append(".".join(map(str, path)))
  if not done:
    raise ValueError(f"LoRA targets {tuple(targets)} match no linear projection of "
                     f"{type(model).__name__}")
  return done


def lora_modules(model):
  return [(p, m) for p, m, _ in _walk(model) if isinstance(m, LoRALinear)]


def merge_lora(model):
  """Folds the adapters into the base kernels and unwraps them; returns the merged paths."""
  merged = []
  for path, child, setter in list(_walk(model)):
    if isinstance(child, LoRALinear):
      k = child.base.kernel
      k[...] = (k[...].astype(jnp.float32) + child.delta()).astype(k.dtype)
      setter(child.base)
      merged.append(".".join(map(str, path)))
  return merged


def _flat_lora(model) -> dict:
  state = nnx.state(model, LoRAParam)
  flat = {}
  for path, v in nnx.to_flat_state(state):
    flat[".".join(map(str, path))] = np.asarray(jax.device_get(v[...]))
  return flat


def save_lora(model, path: str) -> str:
  """Writes `path/adapters.safetensors` and `path/lora_config.json`; returns `path`."""
  from safetensors.numpy import save_file
  mods = lora_modules(model)
  if not mods:
    raise ValueError("the model has no LoRA adapters to save")
  m0 = mods[0][1]
  cfg = dict(rank=m0.rank, alpha=m0.alpha, dropout=m0.dropout_rate,
             targets=[".".join(map(str, p)) for p, _ in mods])
  os.makedirs(path, exist_ok=True)
  save_file(_flat_lora(model), os.path.join(path, "adapters.safetensors"))
  with open(os.path.join(path, "lora_config.json"), "w") as f:
    json.dump(cfg, f, indent=1)
  return path


def load_lora(model, path: str, rngs: nnx.Rngs | None = None):
  """Loads adapters saved by `save_lora` into `model` (applying LoRA first if needed)."""
  from safetensors.numpy import load_file
  with open(os.path.join(path, "lora_config.json")) as f:
    cfg = json.load(f)
  if not lora_modules(model):
    apply_lora(model, rngs=rngs, **cfg)
  tensors = load_file(os.path.join(path, "adapters.safetensors"))
  # files written before the adapters moved into an nnx.LoRA: "<proj>.lora_a"
  tensors.update({k.replace(".lora_a", ".lora.lora_a").replace(".lora_b", ".lora.lora_b"): v
                  for k, v in tensors.items() if ".lora.lora_" not in k})
  state = nnx.state(model, LoRAParam)
  flat = dict(nnx.to_flat_state(state))
  missing = sorted(set(".".join(map(str, p)) for p in flat) - set(tensors))
  if missing:
    raise KeyError(f"adapter file {path} lacks {missing[:4]}{'...' if len(missing) > 4 else ''}")
  for p, var in flat.items():
    arr = tensors[".".join(map(str, p))]
    if arr.shape != tuple(var.shape):
      raise ValueError(f"adapter {'.'.join(map(str, p))}: shape {arr.shape} != {var.shape}")
    var[...] = jnp.asarray(arr, var.dtype)
  nnx.update(model, state)
  return model
