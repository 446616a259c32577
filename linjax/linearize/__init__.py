"""Linearizing: swap the softmax attention of chosen layers for another mixer, reusing weights.

    student = linjax.linearize(model, mixer="lolcats", layers=None, window=64, variant="sw")

returns a new model (the teacher is left intact; `inplace=True` modifies `model` instead)
whose chosen layers hold the new mixer with q/k/v/o_proj (kernels and biases) copied from
the teacher's attention; new parameters such as feature maps are `FeatureMapParam`s at their
init. The choice is recorded in `model.config.mixers` / `mixer_kwargs`, so
`linjax.convert.save_linjax` and `linjax.from_pretrained` round-trip the linearized model.
`method=` (see `linjax.layers.base`) is a mixer kwarg like any other; `set_method` changes
it on a built model.

The pieces the training recipes use (the transfer losses, the objectives) are in
`linjax.linearize.losses`; the training loop is `linjax.train`.
"""
from __future__ import annotations

from flax import nnx

from linjax.layers.mixers import build_mixer, check_mixer_kwargs

SHARED = ("q_proj", "k_proj", "v_proj", "o_proj")
QK_NORMS = ("q_norm", "k_norm")   # Qwen3's per-head q/k RMSNorms (None in other families)
SOFTMAX = ("softmax", "sliding_window")


def layer_ids(layers, n):
  """Layer indices from None (all), ints (Python-style negatives allowed), a slice or a
  predicate; raises naming any index outside [-n, n)."""
  if layers is None:
    return list(range(n))
  if callable(layers):
    return [i for i in range(n) if layers(i)]
  if isinstance(layers, slice):
    return list(range(n))[layers]
  if isinstance(layers, int):
    layers = [layers]
  ids = []
  for i in layers:
    i = int(i)
    if not -n <= i < n:
      raise ValueError(f"layer index {i} is out of range for a model with {n} layers "
                       f"(valid: 0..{n - 1}, or -{n}..-1 from the end)")
    ids.append(i % n)
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


def _copy_norm(src, dst, name):
  if (src is None) != (dst is None):
    raise ValueError(f"{name}: present in one of source / new mixer only")
  if src is not None:
    dst.weight[...] = src.weight[...].astype(dst.weight[...].dtype)


def linearize(model, mixer: str = "lolcats", layers=None, *, seed: int = 0,
              inplace: bool = False, **mixer_kwargs):
  """Replace `self_attn` of `layers` (None: all; ints, a slice or a predicate) by `mixer`.

  Returns the linearized model: a new one unless `inplace=True`.
  """
  check_mixer_kwargs(mixer, mixer_kwargs)
  if not inplace:
    model = nnx.clone(model)
  cfg = model.config
  n = cfg.num_hidden_layers
  ids = layer_ids(layers, n)
  mixers = list(cfg.mixers)
  kwargs = [cfg.layer_mixer_kwargs(i) for i in range(n)]
  for i in ids:
    mixers[i] = mixer
    kwargs[i] = dict(mixer_kwargs)
  mk = None if all(not k for k in kwargs) else kwargs
  new_cfg = cfg.replace(mixers=tuple(mixers), mixer_kwargs=mk)
  for i in ids:
    layer = model.layers[i]
    old = layer.self_attn
    new = build_mixer(mixer, new_cfg, i, rngs=nnx.Rngs(seed + i), **mixer_kwargs)
    for name in SHARED:
      _copy_linear(getattr(old, name), getattr(new, name), f"layers[{i}].self_attn.{name}")
    for name in QK_NORMS:
      _copy_norm(getattr(old, name, None), getattr(new, name, None), f"layers[{i}].self_attn.{name}")
    layer.self_attn = new
  model.config = new_cfg
  return model


def linear_mixers(model):
  """The mixers of `model` that are not plain softmax attention."""
  return [l.self_attn for l in model.layers
          if getattr(l.self_attn, "mixer_name", "softmax") not in SOFTMAX]


def set_method(model, method: str | None, *, softmax: str | None = None):
  """Set `method` on every linear / hybrid mixer (None: leave them) and, with `softmax=`, the
  attention method of the softmax layers; recorded in `model.config.mixer_kwargs`. Returns
  the model."""
  from linjax.layers.base import check_method
  from linjax.ops.softmax import ATTENTION_METHODS
  if method is not None:
    check_method(method)
  if softmax is not None and softmax not in ATTENTION_METHODS:
    raise ValueError(f"softmax attention method must be one of {ATTENTION_METHODS}, got "
                     f"{softmax!r}")
  cfg = model.config
  kwargs = [cfg.layer_mixer_kwargs(i) for i in range(cfg.num_hidden_layers)]
  for i, layer in enumerate(model.layers):
    m = layer.self_attn
    new = softmax if getattr(m, "mixer_name", "softmax") in SOFTMAX else method
    if new is None:
      continue
    m.method = new
    kwargs[i]["method"] = new
  model.config = cfg.replace(mixer_kwargs=None if all(not k for k in kwargs) else kwargs)
  return model


def set_distill(model, kind):
  """kind "mse" | "xent" puts attention-transfer mixers in distillation mode; None ends it.
  The softmax layers kept beside them switch too: in distillation mode they run with their
  base weights and pass their output on without gradient, so every layer's input is the
  teacher's hidden state."""
  from linjax.layers.distill import DISTILL_KINDS, DistillMixin
  if kind is not None and kind not in DISTILL_KINDS:
    raise ValueError(f"distill kind must be one of {DISTILL_KINDS} or None, got {kind!r}")
  for layer in model.layers:
    m = layer.self_attn
    if isinstance(m, DistillMixin) or getattr(m, "mixer_name", None) == "softmax":
      m.distill = kind
  return model


__all__ = ["linearize", "linear_mixers", "layer_ids", "set_method", "set_distill"]


# `linjax.linearize` is both this package and the function: once the package is imported,
# Python binds the attribute `linjax.linearize` to the module, so the module is callable.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
  def __call__(self, *args, **kwargs):
    return linearize(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
