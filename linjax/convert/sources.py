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


class CorruptFileError(UnsupportedFormatError):
  """A checkpoint file is truncated or damaged; the message names its path and size."""


def _size(path) -> str:
  try:
    return f"{os.path.getsize(path):,} bytes"
  except OSError:
    return "size unknown"


def corrupt(path, what, cause) -> CorruptFileError:
  """The error for a damaged `what` ("GGUF file", ...) at `path`, with the reader's cause."""
  msg = " ".join(str(cause).split()) or type(cause).__name__
  return CorruptFileError(f"{what} {path} ({_size(path)}) is truncated or damaged: {msg}")


def read_json(path, what="config"):
  """json.load of `path`; invalid JSON raises UnsupportedFormatError naming the file, line
  and column."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UnsupportedFormatError(f"{path}: invalid JSON in the {what} at line {e.lineno}, "
                                 f"column {e.colno}: {e.msg}") from None


def check_finite(name, x, path):
  """Weights must be finite: a NaN / inf in a stored tensor means damaged data (the formats
  carry no checksum; flipped exponent bits show here)."""
  if x.dtype.kind == "f":
    bad = ~np.isfinite(x)
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise CorruptFileError(f"{path} ({_size(path)}): tensor {name!r} holds {int(bad.sum())} "
                             f"non-finite value(s) (first {x[idx]} at index {idx}); the file "
                             f"is damaged")
  return x


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
      if not os.path.exists(f):
        raise FileNotFoundError(f"safetensors shard {f} does not exist")
      try:
        h = safe_open(f, framework=self._fw)
      except Exception as e:  # noqa: BLE001 - SafetensorError / OSError: name the file
        raise corrupt(f, "safetensors file", e) from None
      self._handles[f] = h
      for k in h.keys():
        self._where[k] = f

  def keys(self):
    return list(self._where)

  def shape(self, name):
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def get(self, name):
    f = self._where[name]
    try:
      t = self._handles[f].get_tensor(name)
    except Exception as e:  # noqa: BLE001
      raise corrupt(f, f"safetensors file (tensor {name!r})", e) from None
    x = _to_numpy(t) if self._fw == "pt" else np.asarray(
        t.astype("float32") if str(t.dtype) == "bfloat16" else t)
    return check_finite(name, x, f)


class TorchSource:
  """A torch state_dict file (pytorch_model.bin, .pt, .pth), memory-mapped when possible."""

  def __init__(self, files: list[str]):
    import torch
    self._sd = {}
    self._file = {}
    for f in files:
      if not os.path.exists(f):
        raise FileNotFoundError(f"torch weights file {f} does not exist")
      try:
        try:
          sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # old (non-zip) serialization cannot be mmapped
          sd = torch.load(f, map_location="cpu", weights_only=True)
      except Exception as e:  # noqa: BLE001 - unpickling / zip errors: name the file
        raise corrupt(f, "torch state_dict file", e) from None
      if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
      if not isinstance(sd, dict):
        raise UnsupportedFormatError(f"{f}: expected a state_dict (dict of tensors), got {type(sd).__name__}")
      self._sd.update(sd)
      self._file.update({k: f for k in sd})
    # A LlamaModel state_dict (no "model." prefix) is accepted too.
    if "embed_tokens.weight" in self._sd and "model.embed_tokens.weight" not in self._sd:
      self._sd = {("model." + k if k != "lm_head.weight" else k): v for k, v in self._sd.items()}

  def keys(self):
    return list(self._sd)

  def shape(self, name):
    return tuple(self._sd[name].shape)

  def get(self, name):
    f = self._file.get(name, self._file.get(name.removeprefix("model."), "the state_dict"))
    return check_finite(name, _to_numpy(self._sd[name]), f)


class GGUFSource:
  """A llama GGUF file, dequantized tensor by tensor, presented under HF names."""

  def __init__(self, path_or_reader, config):
    self.reader = _reader(path_or_reader)
    self.path = getattr(self.reader, "linjax_path", None) or (
        path_or_reader if isinstance(path_or_reader, str) else "the GGUF file")
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
    try:
      x = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(self.shape(name))
    except (ValueError, IndexError) as e:
      raise corrupt(self.path, f"GGUF file (tensor {t.name!r})", e) from None
    return mapping.gguf_transform(t.name, check_finite(t.name, x, self.path), self.config)


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


def open_gguf(path):
  """gguf.GGUFReader(path); a truncated or damaged file raises CorruptFileError naming the
  path and size (the reader itself fails with a bare numpy reshape / IndexError)."""
  from gguf import GGUFReader
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such GGUF file: {path}")
  try:
    r = GGUFReader(path)
  except Exception as e:  # noqa: BLE001 - ValueError / IndexError / struct.error from gguf
    raise corrupt(path, "GGUF file", e) from None
  r.linjax_path = path
  return r


def _reader(path_or_reader):
  if isinstance(path_or_reader, str):
    return open_gguf(path_or_reader)
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
      idx = read_json(os.path.join(d, index), "weight index")
      if not isinstance(idx.get("weight_map"), dict):
        raise UnsupportedFormatError(f"{os.path.join(d, index)}: no \"weight_map\" object")
      wm = idx["weight_map"]
      return kind, [os.path.join(d, x) for x in sorted(set(wm.values()))]
    if os.path.exists(os.path.join(d, single)):
      return kind, [os.path.join(d, single)]
  raise UnsupportedFormatError(
      f"{d}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
      f"pytorch_model.bin.index.json")
