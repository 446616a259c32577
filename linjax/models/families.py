"""The Llama-family architectures linjax reads and writes, as switches of one `LlamaConfig`.

They share the Llama block (RMSNorm, SwiGLU MLP, rotary, GQA); an HF config's `model_type`
names the family and sets what differs (transformers' own modeling code decides what each
HF key means; keys a family's transformers code ignores are ignored here too):

  model_type  architectures       differs from Llama                         HF keys read
  llama       LlamaForCausalLM    (rope scaling default / linear / llama3)   attention_bias, mlp_bias
  mistral     MistralForCausalLM  sliding-window attention in every layer    sliding_window
  qwen2       Qwen2ForCausalLM    q/k/v biases, no o_proj bias; sliding      use_sliding_window,
                                  window on the layers `layer_types` names   sliding_window,
                                                                             max_window_layers,
                                                                             layer_types
  qwen3       Qwen3ForCausalLM    RMSNorm of q and k per head before rotary  attention_bias + qwen2's
                                  (q_norm, k_norm); sliding as qwen2

The switches (`FEATURES`, fields of `LlamaConfig`): attention_bias (q/k/v/o biases), mlp_bias,
qkv_bias (q/k/v biases only), qk_norm, sliding_window (the window, None = full attention) and
layer_types (per layer "full_attention" | "sliding_attention"; None = every layer slides when
sliding_window is set). A config whose switches its family cannot express (a Llama with q/k
norms, say) keeps them under config.json's "linjax" and exports as a linjax model.
"""
from __future__ import annotations

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaModel"),
    "mistral": ("MistralForCausalLM", "MistralModel"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Model"),
}
SUPPORTED = tuple(ARCHITECTURES)
FEATURES = ("attention_bias", "mlp_bias", "qkv_bias", "qk_norm", "sliding_window", "layer_types")
LAYER_TYPES = ("full_attention", "sliding_attention")
# every HF key a family parser below reads (the others are the common Llama keys)
FAMILY_KEYS = FEATURES + ("use_sliding_window", "max_window_layers")
QWEN_MAX_WINDOW_LAYERS = 28   # transformers' Qwen2Config / Qwen3Config default


class UnsupportedFamilyError(ValueError):
  """An HF config of an architecture (or a family option) linjax does not implement."""


def check_model_type(mt, archs=None) -> str:
  if mt not in ARCHITECTURES:
    raise UnsupportedFamilyError(
        f"unsupported architecture: model_type={mt!r} (architectures={archs}); linjax "
        f"converts the Llama family: model_type one of {list(SUPPORTED)}")
  for a in archs or ():
    if a not in ARCHITECTURES[mt]:
      raise UnsupportedFamilyError(
          f"unsupported architectures {list(archs)} for model_type {mt!r} (expected "
          f"{ARCHITECTURES[mt][0]})")
  return mt


def _window(v, where):
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise UnsupportedFamilyError(f"{where}: sliding_window must be a positive int or null, "
                                 f"got {v!r}")
  return v


def parse(mt: str, hf: dict) -> dict:
  """The FEATURES of an HF config dict of family `mt`; pops the keys it reads from `hf`
  (a FEATURES key left in `hf` afterwards is one the family does not have)."""
  pop = lambda k, d=None: hf.pop(k, d)
  out = dict(attention_bias=False, mlp_bias=False, qkv_bias=False, qk_norm=False,
             sliding_window=None, layer_types=None)
  if mt == "llama":
    out["attention_bias"] = bool(pop("attention_bias", False))
    out["mlp_bias"] = bool(pop("mlp_bias", False))
    types = pop("layer_types")            # transformers' Llama has no sliding layers
    if types and any(t != "full_attention" for t in types):
      raise UnsupportedFamilyError(f"llama: layer_types {sorted(set(types))}: transformers' "
                                   f"Llama has full attention in every layer")
    return out
  # transformers' Mistral / Qwen code ignores these (no biases there, or q/k/v only)
  pop("mlp_bias")
  bias = pop("attention_bias", False)
  if mt == "mistral":
    out["sliding_window"] = _window(pop("sliding_window"), "mistral")
    pop("layer_types")                     # transformers' Mistral ignores them (it warns)
    return out
  # qwen2 / qwen3: the window only where layer_types say "sliding_attention"
  use = bool(pop("use_sliding_window", False))
  window = _window(pop("sliding_window"), mt)
  max_window = pop("max_window_layers", QWEN_MAX_WINDOW_LAYERS)
  types = pop("layer_types")
  if use and window is not None:
    n = int(hf["num_hidden_layers"])
    out["sliding_window"] = window
    out["layer_types"] = check_layer_types(types, n) if types else tuple(   # transformers' default
        "sliding_attention" if i >= int(max_window) else "full_attention" for i in range(n))
  if mt == "qwen2":
    out["qkv_bias"] = True
  else:
    out["qk_norm"] = True
    out["attention_bias"] = bool(bias)
  return out


def check_layer_types(types, n):
  """Tuple of per-layer types (each in LAYER_TYPES); n layers when n is given."""
  if types is None:
    return None
  types = tuple(types)
  bad = sorted({t for t in types if t not in LAYER_TYPES})
  if bad:
    raise UnsupportedFamilyError(f"layer_types {bad} are not supported (one of {LAYER_TYPES})")
  if n is not None and len(types) != n:
    raise UnsupportedFamilyError(f"layer_types has {len(types)} entries for {n} layers")
  return types


def layer_windows(cfg) -> list:
  """The softmax window of every layer of `cfg` (None: full attention)."""
  w = cfg.sliding_window
  if w is None:
    return [None] * cfg.num_hidden_layers
  if cfg.layer_types is None:
    return [w] * cfg.num_hidden_layers
  return [w if t == "sliding_attention" else None for t in cfg.layer_types]


def hf_keys(cfg) -> dict:
  """The family keys of `cfg`'s HF config (transformers' names for its model_type)."""
  mt = cfg.model_type
  if mt == "llama":
    return {"attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias}
  wins = layer_windows(cfg)
  if mt == "mistral":
    return {"sliding_window": cfg.sliding_window}
  sliding = [i for i, w in enumerate(wins) if w is not None]
  d = {"use_sliding_window": bool(sliding), "sliding_window": cfg.sliding_window if sliding else None,
       "max_window_layers": sliding[0] if sliding else cfg.num_hidden_layers,
       "layer_types": ["sliding_attention" if w is not None else "full_attention" for w in wins]}
  if mt == "qwen3":
    d["attention_bias"] = cfg.attention_bias
  return d


def features(cfg) -> dict:
  """What the FEATURES compute, comparable across spellings (per-layer windows)."""
  return dict(attention_bias=bool(cfg.attention_bias), mlp_bias=bool(cfg.mlp_bias),
              qkv_bias=bool(cfg.qkv_bias), qk_norm=bool(cfg.qk_norm), windows=layer_windows(cfg))


def expressible(cfg) -> bool:
  """Does the HF config of cfg.model_type (transformers' own class) describe cfg's switches?"""
  class _C:   # the switches the family's keys give back
    pass
  c = _C()
  c.num_hidden_layers = cfg.num_hidden_layers
  c.__dict__.update(parse(cfg.model_type, {**hf_keys(cfg), "num_hidden_layers": c.num_hidden_layers}))
  return features(c) == features(cfg)
