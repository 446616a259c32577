"""Readers that hand out one HF-named tensor at a time (nothing is loaded up front).

Each source has `keys()`, `shape(name)` and `get(name) -> np.ndarray`; `get` reads (and for
GGUF dequantizes) just that tensor, so peak host memory is about one tensor beyond the model.
"""
from __future__ import annotations

import json
import os

import numpy as np

from linjax.convert import mapping


class UnsupportedFormatError(ValueError):
  """The path is not a checkpoint format linjax reads."""


def _to_numpy(t):
  """torch tensor -> numpy; bfloat16 and other non-numpy dtypes go through float32."""
  import torch
  t = t.detach()
  if t.dtype in (torch.bfloat16, torch.float16):
    return t.float().numpy()
  return t.numpy()


class SafetensorsSource:
  """One or more .safetensors files (an index json maps names to files)."""

  def __init__(self, files: list[str]):
    from safetensors import safe_open
    try:
      import torch  # noqa: F401  (the "pt" framework reads bf16; numpy cannot)
      self._fw = "pt"
    except ImportError:
      self._fw = "flax"
    self._handles = {}
    self._where = {}
    for f in files:
      h = safe_open(f, framework=self._fw)
      self._handles[f] = h
      for k in h.keys():
        self._where[k] = f

  def keys(self):
    return list(self._where)

  def shape(self, name):
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def get(self, name):
    t = self._handles[self._where[name]].get_tensor(name)
    if self._fw == "pt":
      return _to_numpy(t)
    return np.asarray(t.astype("float32") if str(t.dtype) == "bfloat16" else t)


class TorchSource:
  """A torch state_dict file (pytorch_model.bin, .pt, .pth), memory-mapped when possible."""

  def __init__(self, files: list[str]):
    import torch
    self._sd = {}
    for f in files:
      try:
        sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
      except RuntimeError:  # old (non-zip) serialization cannot be mmapped
        sd = torch.load(f, map_location="cpu", weights_only=True)
      if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
      if not isinstance(sd, dict):
        raise UnsupportedFormatError(f"{f}: expected a state_dict (dict of tensors), got {type(sd).__name__}")
      self._sd.update(sd)
    # A LlamaModel state_dict (no "model." prefix) is accepted too.
    if "embed_tokens.weight" in self._sd and "model.embed_tokens.weight" not in self._sd:
      self._sd = {("model." + k if k != "lm_head.weight" else k): v for k, v in self._sd.items()}

  def keys(self):
    return list(self._sd)

  def shape(self, name):
    return tuple(self._sd[name].shape)

  def get(self, name):
    return _to_numpy(self._sd[name])


class GGUFSource:
  """A llama GGUF file, dequantized tensor by tensor, presented under HF names."""

  def __init__(self, path_or_reader, config):
    self.reader = _reader(path_or_reader)
    self.config = config
    self._by_hf = {}
    self.unmapped = []
    for t in self.reader.tensors:
      hf = mapping.gguf_to_hf_name(t.name)
      if hf is None:
        if t.name not in mapping.GGUF_IGNORABLE:
          self.unmapped.append(t.name)
        continue
      self._by_hf[hf] = t

  def keys(self):
    return list(self._by_hf) + self.unmapped

  def shape(self, name):
    return tuple(int(s) for s in reversed(self._by_hf[name].shape))

  def get(self, name):
    from gguf.quants import dequantize
    t = self._by_hf[name]
    x = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(self.shape(name))
    return mapping.gguf_transform(t.name, x, self.config)


def gguf_metadata(reader) -> dict:
  out = {}
  for k, f in reader.fields.items():
    if k.startswith("tokenizer.ggml.") and k.split(".")[-1] in ("tokens", "merges", "scores", "token_type"):
      continue
    try:
      out[k] = f.contents()
    except Exception:  # pragma: no cover - exotic field types
      pass
  return out


def _reader(path_or_reader):
  if isinstance(path_or_reader, str):
    from gguf import GGUFReader
    return GGUFReader(path_or_reader)
  return path_or_reader


def gguf_hf_config(path_or_reader) -> dict:
  """An HF-style config dict read from a GGUF file's metadata (llama only)."""
  r = _reader(path_or_reader)
  md = gguf_metadata(r)
  arch = md.get("general.architecture")
  if arch != "llama":
    return {"model_type": arch}
  names = {t.name for t in r.tensors}
  emb = next(t for t in r.tensors if t.name == "token_embd.weight")
  g = lambda k, d=None: md.get(f"llama.{k}", d)
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  cfg = {
      "model_type": "llama", "architectures": ["LlamaForCausalLM"],
      "vocab_size": int(g("vocab_size", int(emb.shape[1]))),
      "hidden_size": hidden,
      "intermediate_size": int(g("feed_forward_length")),
      "num_hidden_layers": int(g("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(g("attention.head_count_kv", heads)),
      "head_dim": int(g("attention.key_length", g("rope.dimension_count", hidden // heads))),
      "max_position_embeddings": int(g("context_length", 2048)),
      "rms_norm_eps": float(np.float32(g("attention.layer_norm_rms_epsilon", 1e-5))),
      "rope_theta": float(g("rope.freq_base", 10000.0)),
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names,
      "mlp_bias": "blk.0.ffn_up.bias" in names,
      "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
  }
  stype = g("rope.scaling.type")
  if stype and stype != "none":
    if stype != "linear":
      cfg["rope_scaling"] = {"rope_type": f"gguf:{stype}"}  # refused by LlamaConfig by name
    else:
      cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
  if "rope_freqs.weight" in names:
    cfg["rope_scaling"] = {"rope_type": "gguf:rope_freqs"}  # llama3-style table: not read yet
  return cfg


def find_hf_weight_files(d: str) -> tuple[str, list[str]]:
  """('safetensors' | 'torch', files) for an HF directory, or raise UnsupportedFormatError."""
  for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                              ("torch", "pytorch_model.bin", "pytorch_model.bin.index.json")):
    if os.path.exists(os.path.join(d, index)):
      with open(os.path.join(d, index)) as f:
        wm = json.load(f)["weight_map"]
      return kind, [os.path.join(d, x) for x in sorted(set(wm.values()))]
    if os.path.exists(os.path.join(d, single)):
      return kind, [os.path.join(d, single)]
  raise UnsupportedFormatError(
      f"{d}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
      f"pytorch_model.bin.index.json")
