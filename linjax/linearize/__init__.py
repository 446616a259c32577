"""Linearizing: swap the softmax attention of chosen layers for another mixer, reusing weights.

    model = linjax.linearize(model, mixer="lolcats", layers=None, window=64, variant="sw")

copies q/k/v/o_proj (kernels and biases) of each chosen layer into the new mixer (new
parameters such as feature maps are `FeatureMapParam`s at their init), and records the
choice in `model.config.mixers` / `mixer_kwargs`, so `linjax.convert.save_linjax` and
`linjax.from_pretrained` round-trip the linearized model.

Recipes (`linjax.linearize.recipes`): attention transfer (LoLCATs stage 1, Hedgehog),
LoRA / full fine-tuning with cross-entropy (LoLCATs stage 2, Liger, SUPRA);
`linjax.linearize.run` runs one from an `experiments/*.py` config.
"""
from __future__ import annotations

from flax import nnx

from linjax.layers.mixers import get_mixer

SHARED = ("q_proj", "k_proj", "v_proj", "o_proj")


def _layer_ids(layers, n):
  if layers is None:
    return list(range(n))
  if callable(layers):
    return [i for i in range(n) if layers(i)]
  if isinstance(layers, slice):
    return list(range(n))[layers]
  ids = [int(i) % n for i in layers]
  return sorted(set(ids))


def _copy_linear(src, dst, name):
  """Copy kernel and bias of one projection (an nnx.Linear or anything with those)."""
  for attr in ("kernel", "bias"):
    s, d = getattr(src, attr, None), getattr(dst, attr, None)
    if (s is None) != (d is None):
      raise ValueError(f"{name}.{attr}: present in one of source / new mixer only "
                       "(merge LoRA before linearizing)")
    if s is None:
      continue
    if s[...].shape != d[...].shape:
      raise ValueError(f"{name}.{attr}: shape {s[...].shape} vs {d[...].shape}")
    d[...] = s[...].astype(d[...].dtype)


def linearize(model, mixer: str = "lolcats", layers=None, *, seed: int = 0, **mixer_kwargs):
  """Replace `self_attn` of `layers` (None: all; ints, a slice or a predicate) by `mixer`.

  Returns the same model object, modified in place.
  """
  cfg = model.config
  n = cfg.num_hidden_layers
  ids = _layer_ids(layers, n)
  cls = get_mixer(mixer)
  mixers = list(cfg.mixers)
  kwargs = [cfg.layer_mixer_kwargs(i) for i in range(n)]
  for i in ids:
    mixers[i] = mixer
    kwargs[i] = dict(mixer_kwargs)
  if all(not k for k in kwargs):
    mk = None
  else:
    mk = kwargs
  new_cfg = cfg.replace(mixers=tuple(mixers), mixer_kwargs=mk)
  for i in ids:
    layer = model.layers[i]
    old = layer.self_attn
    new = cls(new_cfg, i, rngs=nnx.Rngs(seed + i), **mixer_kwargs)
    for name in SHARED:
      _copy_linear(getattr(old, name), getattr(new, name), f"layers[{i}].self_attn.{name}")
    layer.self_attn = new
  model.config = new_cfg
  return model


def linear_mixers(model):
  """The mixers of `model` that are not plain softmax attention."""
  return [l.self_attn for l in model.layers if getattr(l.self_attn, "mixer_name", "softmax")
          not in ("softmax", "sliding_window")]


def set_mode(model, mode: str):
  """Set `mode` ("quadratic" | "chunk" | "recurrent") on every linear mixer."""
  for m in linear_mixers(model):
    if hasattr(m, "mode"):
      m.mode = mode
  return model


def set_distill(model, kind):
  """kind "mse" | "xent" puts attention-transfer mixers in distillation mode; None ends it."""
  for m in linear_mixers(model):
    if hasattr(m, "distill"):
      m.distill = kind
  return model


__all__ = ["linearize", "linear_mixers", "set_mode", "set_distill"]


# `linjax.linearize` is both this package and the function: once the package is imported,
# Python binds the attribute `linjax.linearize` to the module, so the module is callable.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
  def __call__(self, *args, **kwargs):
    return linearize(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
