"""The one reversible name table between HF Llama tensors and linjax state paths.

Each row: HF name <-> linjax path (a tuple, as in `nnx.to_flat_state`) + a transform.
`to_linjax(name, array)` and `to_hf(path, array)` apply the transform one way or the other:

  "T"     HF Linear weights are [out, in]; nnx.Linear kernels are [in, out]
  None    identity (embeddings, norms, biases)

GGUF adds a name table onto HF names plus llama.cpp's rotary permutation of q/k rows,
undone exactly like transformers' `LlamaTensorProcessor._reverse_permute_weights`.
"""
from __future__ import annotations

import numpy as np

# (HF suffix inside a layer, linjax path inside a layer, transform)
_LAYER_ROWS = [
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), "T"),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), "T"),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), "T"),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), "T"),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "T"),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "T"),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "T"),
    ("input_layernorm.weight", ("input_layernorm", "weight"), None),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), None),
]
_ATTN_BIAS_ROWS = [(f"self_attn.{p}.bias", ("self_attn", p, "bias"), None)
                   for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
_QK_NORM_ROWS = [(f"self_attn.{p}.weight", ("self_attn", p, "weight"), None)
                 for p in ("q_norm", "k_norm")]                      # Qwen3
_MLP_BIAS_ROWS = [(f"mlp.{p}.bias", ("mlp", p, "bias"), None)
                  for p in ("gate_proj", "up_proj", "down_proj")]

# HF names that carry no weights linjax needs (buffers some checkpoints include).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def name_table(config) -> dict[str, tuple[tuple, str | None]]:
  """{HF name: (linjax path, transform)} for a softmax Llama (any family of
  `linjax.models.families`) described by `config`."""
  t = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), None),
       "model.norm.weight": (("norm", "weight"), None)}
  if not config.tie_word_embeddings:
    t["lm_head.weight"] = (("lm_head", "kernel"), "T")
  rows = list(_LAYER_ROWS)
  if config.attention_bias:
    rows += _ATTN_BIAS_ROWS
  elif getattr(config, "qkv_bias", False):                          # Qwen2: no o_proj bias
    rows += _ATTN_BIAS_ROWS[:3]
  if getattr(config, "qk_norm", False):
    rows += _QK_NORM_ROWS
  if config.mlp_bias:
    rows += _MLP_BIAS_ROWS
  for i in range(config.num_hidden_layers):
    for hf, path, tr in rows:
      t[f"model.layers.{i}.{hf}"] = (("layers", i) + path, tr)
  return t


def full_name_table(config, paths) -> dict[str, tuple[tuple, str | None]]:
  """`name_table` plus a row for every other mixer parameter among `paths` (linjax state
  paths): ("layers", i, "self_attn", *rest) <-> "model.layers.{i}.self_attn.<rest joined by
  dots>", where a trailing nnx.Linear "kernel" becomes "weight" (transposed) and every other
  parameter (feature maps, window factors, gates, ...) keeps its name and layout."""
  t = name_table(config)
  covered = {path for path, _ in t.values()}
  for p in paths:
    p = tuple(p)
    if p in covered or len(p) < 4 or p[0] != "layers" or p[2] != "self_attn":
      continue
    rest, tr = [str(x) for x in p[3:]], None
    if rest[-1] == "kernel":
      rest[-1], tr = "weight", "T"
    t[f"model.layers.{p[1]}.self_attn." + ".".join(rest)] = (p, tr)
  return t


def apply(transform, x, inverse=False):
  del inverse  # both transforms are their own inverse
  if transform is None:
    return x
  if transform == "T":
    return x.T
  raise ValueError(f"unknown transform {transform!r}")


def hf_shape(transform, linjax_shape):
  return tuple(reversed(linjax_shape)) if transform == "T" else tuple(linjax_shape)


# --- GGUF ------------------------------------------------------------------------------

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GGUF_IGNORABLE = ("rope_freqs.weight",)


def gguf_to_hf_name(name: str) -> str | None:
  """HF name of a GGUF llama tensor, or None when it has no HF counterpart."""
  if name in _GGUF_GLOBAL:
    return _GGUF_GLOBAL[name]
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER:
    return f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}"
  return None


def gguf_unpermute(x: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (its rope pairs adjacent dims; HF rotates halves)."""
  dim = x.shape[0] // n_head // 2
  w = x.reshape(n_head, dim, 2, *x.shape[1:])
  return w.swapaxes(2, 1).reshape(x.shape)


def gguf_permute(x: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (HF -> GGUF), the inverse of `gguf_unpermute`."""
  dim = x.shape[0] // n_head // 2
  w = x.reshape(n_head, 2, dim, *x.shape[1:])
  return w.swapaxes(1, 2).reshape(x.shape)


def gguf_transform(name: str, x: np.ndarray, config) -> np.ndarray:
  """GGUF tensor -> the HF tensor of the same weight."""
  if ".attn_q." in name:
    return gguf_unpermute(x, config.num_attention_heads)
  if ".attn_k." in name:
    return gguf_unpermute(x, config.num_key_value_heads)
  return x
