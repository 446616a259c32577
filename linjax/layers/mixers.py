"""The token-mixer slot of a Llama layer, and the registry that fills it.

A mixer is an `nnx.Module` built as `cls(config, layer_idx, *, rngs, **kwargs)` where
`config` is a `linjax.models.llama.LlamaConfig` (shared pieces: `linjax.layers.base`). It
implements

  __call__(x, *, positions, segment_ids=None, cache=None) -> (y, cache)
      x: [B, T, hidden]; positions: [B, T] int32; segment_ids: [B, T] int32 or None
      (packed documents; tokens attend / recur only within their segment; id 0 = padding
      in decode batches). With `cache=None` it is a full-sequence pass and returns
      (y, None). With a cache (from `init_cache`) it consumes T new tokens (prefill T > 1
      or decode T = 1), returns the updated cache, and must equal the full pass.
  init_cache(batch_size, max_len, dtype) -> pytree of arrays (the decode state)

and takes a `method=` kwarg (see `linjax.layers.base`). Register with
`@register_mixer("name")`; the Llama config names mixers per layer. One file per family:

  attention.py         softmax, sliding_window
  linear_attention.py  linear (any feature map), retention, lightning
  gla.py               gla
  deltanet.py          deltanet, gated_deltanet
  supra.py             supra
  lolcats.py           lolcats
  liger.py             liger
"""
from __future__ import annotations

import importlib
import inspect

_REGISTRY: dict[str, type] = {}
BUILTIN = ("attention", "linear_attention", "gla", "deltanet", "supra", "lolcats", "liger")


def register_mixer(name: str):
  def deco(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"mixer {name!r} is already registered to {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    cls.mixer_name = name
    return cls
  return deco


def _import_builtin_mixers():
  for mod in BUILTIN:
    importlib.import_module(f"linjax.layers.{mod}")


def get_mixer(name: str) -> type:
  _import_builtin_mixers()
  if name not in _REGISTRY:
    raise ValueError(f"unknown mixer {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def available_mixers() -> list[str]:
  _import_builtin_mixers()
  return sorted(_REGISTRY)


def mixer_kwargs_names(name: str) -> list[str]:
  """The keyword arguments mixer `name` accepts (its constructor's, through its bases)."""
  cls = get_mixer(name)
  names = set()
  for c in cls.__mro__:
    init = c.__dict__.get("__init__")
    if init is None:
      continue
    params = inspect.signature(init).parameters
    names |= {p for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p != "rngs"}
    if not any(v.kind == v.VAR_KEYWORD for v in params.values()):
      break
  return sorted(names)


def check_mixer_kwargs(name: str, kwargs: dict, where: str = "") -> None:
  """Raise a ValueError naming unknown mixer kwargs and listing the valid ones."""
  valid = mixer_kwargs_names(name)
  bad = sorted(set(kwargs) - set(valid))
  if bad:
    raise ValueError(f"unknown keyword argument(s) {bad} for mixer {name!r}{where}; valid: "
                     f"{valid}")


def build_mixer(name: str, config, layer_idx: int, *, rngs, **kwargs):
  check_mixer_kwargs(name, kwargs, f" (layer {layer_idx})")
  return get_mixer(name)(config, layer_idx, rngs=rngs, **kwargs)
