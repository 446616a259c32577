"""The token-mixer slot of a Llama layer, and the registry that fills it.

A mixer is an `nnx.Module` built as `cls(config, layer_idx, *, rngs, **kwargs)` where
`config` is a `linjax.models.llama.LlamaConfig`. It keeps HF attribute names for the
projections it shares with softmax attention (`q_proj`, `k_proj`, `v_proj`, `o_proj`), so
`linjax.linearize` can copy weights by name. It implements

  __call__(x, *, positions, segment_ids=None, cache=None) -> (y, cache)
      x: [B, T, hidden]; positions: [B, T] int32; segment_ids: [B, T] int32 or None
      (packed documents; tokens attend / recur only within their segment; id 0 = padding
      in decode batches). With `cache=None` it is a full-sequence pass and returns
      (y, None). With a cache (from `init_cache`) it consumes T new tokens (prefill T > 1
      or decode T = 1), returns the updated cache, and must equal the full pass.
  init_cache(batch_size, max_len, dtype) -> pytree of arrays (the decode state)

Register with `@register_mixer("name")`; the Llama config names mixers per layer.
"""
from __future__ import annotations

_REGISTRY: dict[str, type] = {}


def register_mixer(name: str):
  def deco(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"mixer {name!r} is already registered to {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    cls.mixer_name = name
    return cls
  return deco


def get_mixer(name: str) -> type:
  _import_builtin_mixers()
  if name not in _REGISTRY:
    raise ValueError(f"unknown mixer {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def available_mixers() -> list[str]:
  _import_builtin_mixers()
  return sorted(_REGISTRY)


def _import_builtin_mixers():
  # Modules that register mixers on import. Missing ones are skipped so the registry works
  # while the package grows; a module that exists but fails to import raises.
  import importlib
  import importlib.util
  for mod in ("linjax.layers.attention", "linjax.layers.linear_mixers",
              "linjax.layers.hybrid_mixers"):
    if importlib.util.find_spec(mod) is not None:
      importlib.import_module(mod)
