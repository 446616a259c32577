"""Hugging Face export of any linjax model: config, tensors, modeling code, PEFT adapters.

A model whose every layer is plain softmax attention exports as its family's transformers
class (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`; no
code needed; see `linjax.models.families`). Any other mixer exports as `LinjaxLlamaForCausalLM`:
config.json gets `model_type` "linjax_llama", `architectures`, an `auto_map` and the layers'
mixers (stored once when layers share them), and the PyTorch modeling code shipped in
`linjax/convert/hf/` is copied beside it, so

    transformers.AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

runs it. Tensor names: the Llama table of `mapping` plus each mixer parameter under
`model.layers.{i}.self_attn.<its linjax path>` (nnx.Linear kernels as `.weight`, transposed).

LoRA: `lora="merge"` folds linjax LoRA adapters into the exported weights; `lora="base"`
exports the base weights, and `save_peft_adapter` writes the adapters in PEFT's format
(`adapter_config.json` + `adapter_model.safetensors`) for `peft.PeftModel.from_pretrained`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from linjax.convert import mapping
from linjax.convert.hf import linjax_spec as spec
from linjax.models import families

HF_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
LORA_MODES = (None, "merge", "base")


class UnsupportedExportError(ValueError):
  """The model cannot be written in the requested format."""


# --- config ---------------------------------------------------------------------------

def is_plain_llama(cfg) -> bool:
  """All softmax, dense FFNs, and switches the family's own transformers class has."""
  return cfg.all_softmax and cfg.all_dense_mlp and families.expressible(cfg)


def _family_switches(cfg) -> dict:
  """The family switches as explicit keys of a linjax_llama config (the torch code reads
  them; `as_llama_hf` moves them back under "linjax")."""
  return {"base_model_type": cfg.model_type,
          **{k: (list(v) if isinstance(v, tuple) else v)
             for k, v in ((k, getattr(cfg, k)) for k in families.FEATURES)}}


def export_config(cfg) -> dict:
  """config.json of the HF export (the family's transformers class for all-softmax models)."""
  hf = cfg.to_hf()
  hf.pop("linjax", None)
  if is_plain_llama(cfg):
    return hf
  for k in families.FAMILY_KEYS:       # the family's own spelling: replaced by explicit switches
    hf.pop(k, None)
  hf.update(_family_switches(cfg))
  if not cfg.all_dense_mlp:
    kinds = sorted(set(cfg.mlp) - {"dense"})
    raise UnsupportedExportError(
        f"cannot export to Hugging Face format: the model has structured FFNs (mlp={kinds}), "
        f"which transformers' Llama and linjax's modeling code do not implement; export "
        f"linjax.merge_ffn(model) (the factors multiplied out, exact) or keep it as a linjax "
        f"checkpoint (linjax.convert.save_linjax)")
  names = list(cfg.mixers)
  kws = []
  for i, n in enumerate(names):
    try:
      kws.append(spec.check_mixer(n, cfg.layer_mixer_kwargs(i), where=f"layer {i}"))
    except spec.UnknownMixerError as e:
      raise UnsupportedExportError(f"cannot export to Hugging Face format: {e}") from None
  hf["architectures"] = [spec.ARCHITECTURE]
  hf["model_type"] = spec.MODEL_TYPE
  hf["auto_map"] = dict(spec.AUTO_MAP)
  # transformers 5's rope layout (linjax reads both)
  scaling = hf.pop("rope_scaling", None) or {"rope_type": "default"}
  hf["rope_parameters"] = {**scaling, "rope_theta": hf.pop("rope_theta")}
  hf["mixers"], hf["mixer_kwargs"] = spec.pack(names, kws)
  return hf


def native_config(cfg) -> dict:
  """config.json of a linjax (orbax) checkpoint: HF keys + "linjax"; a linearized model names
  its own architecture, so transformers never reads it as a softmax Llama."""
  hf = cfg.to_hf()
  if not is_plain_llama(cfg):
    for k in families.FAMILY_KEYS:
      hf.pop(k, None)
    hf.update(_family_switches(cfg))
    hf["architectures"] = [spec.ARCHITECTURE]
    hf["model_type"] = spec.MODEL_TYPE
  return hf


def as_llama_hf(hf: dict) -> dict:
  """A linjax export / checkpoint config (model_type "linjax_llama") in the form
  `LlamaConfig.from_hf` reads (mixers under "linjax"); other configs pass through."""
  if hf.get("model_type") != spec.MODEL_TYPE:
    return hf
  hf = dict(hf)
  hf.pop("auto_map", None)
  mt = hf.pop("base_model_type", "llama")
  hf["model_type"] = mt
  hf["architectures"] = [families.ARCHITECTURES.get(mt, ("?",))[0]]
  lj = dict(hf.get("linjax") or {})
  for k in families.FAMILY_KEYS:   # explicit switches (older exports: attention / mlp bias)
    if k in hf:
      v = hf.pop(k)
      if k in families.FEATURES:
        lj.setdefault(k, v)
  if "mixers" in hf or "mixer_kwargs" in hf:
    names, kws = spec.unpack(hf.pop("mixers", None), hf.pop("mixer_kwargs", None),
                             hf["num_hidden_layers"])
    lj["mixers"] = names
    lj["mixer_kwargs"] = kws if any(kws) else None
  if lj:
    hf["linjax"] = lj
  return hf


# --- tensors --------------------------------------------------------------------------

def lora_adapters(model) -> dict:
  """{module path: (lora_a [in, r], lora_b [r, out], scale, dropout)} of linjax LoRA."""
  from linjax.layers.lora import lora_modules
  out = {}
  for mpath, mod in lora_modules(model):
    a = np.asarray(jax.device_get(mod.lora_a.get_value()), np.float32)
    b = np.asarray(jax.device_get(mod.lora_b.get_value()), np.float32)
    out[tuple(mpath)] = (a, b, float(mod.scale), float(mod.dropout_rate))
  return out


def plain_params(model, lora=None) -> dict:
  """{linjax path without LoRA wrappers: numpy array} of every weight; LoRA adapters are
  folded in (lora="merge"), dropped (lora="base"), or refused (None)."""
  if lora not in LORA_MODES:
    raise ValueError(f"lora must be one of {LORA_MODES}, got {lora!r}")
  adapters = lora_adapters(model)
  if adapters and lora is None:
    raise UnsupportedExportError(
        f"the model carries LoRA adapters on {len(adapters)} projections; export with "
        f"lora='merge' (fold them into the weights) or lora='base' (base weights; write the "
        f"adapters with linjax.convert.save_peft_adapter)")
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for path, var in flat.items():
    mpath = next((m for m in adapters if path[:len(m)] == m), None)
    x = np.asarray(jax.device_get(var.get_value()))
    if mpath is None:
      out[path] = x
      continue
    rest = path[len(mpath):]
    if rest[0] == "lora":            # the adapter (an nnx.LoRA: lora/lora_a, lora/lora_b)
      continue
    if rest[0] != "base":
      raise UnsupportedExportError(f"unexpected LoRA parameter {'/'.join(map(str, path))}")
    if rest == ("base", "kernel") and lora == "merge":
      a, b, scale, _ = adapters[mpath]
      x = (x.astype(np.float32) + scale * (a @ b)).astype(x.dtype)
    out[mpath + rest[1:]] = x
  return out


def hf_tensors(model, dtype=None, lora=None):
  """Yield (HF name, numpy array) one tensor at a time, for any mixer."""
  import jax.numpy as jnp
  params = plain_params(model, lora)
  table = mapping.full_name_table(model.config, params)
  covered = {p for p, _ in table.values()}
  left = sorted("/".join(map(str, p)) for p in params if p not in covered)
  if left:
    raise UnsupportedExportError(f"no Hugging Face name for parameters {left}")
  if not is_plain_llama(model.config):
    export_config(model.config)  # refuses unknown mixers before any tensor is written
  for name, (path, tr) in table.items():
    x = params[path]
    if dtype is not None:
      x = x.astype(jnp.dtype(dtype))
    yield name, np.ascontiguousarray(mapping.apply(tr, x, inverse=True))


# --- writing a folder atomically ------------------------------------------------------

class staged_dir:
  """`with staged_dir(out, overwrite) as tmp:` write into tmp; on success tmp becomes `out`
  (an old `out` is replaced only with overwrite=True); on failure nothing is left behind."""

  def __init__(self, out_dir, overwrite=False):
    self.out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(self.out) and not os.path.isdir(self.out):
      raise FileExistsError(f"{self.out} exists and is not a folder")
    if os.path.isdir(self.out) and os.listdir(self.out) and not overwrite:
      raise FileExistsError(f"{self.out} is not empty: export into a new or empty folder "
                            f"(or pass overwrite=True to replace it)")

  def __enter__(self):
    parent = os.path.dirname(self.out)
    os.makedirs(parent, exist_ok=True)
    self.tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(self.out)}.tmp-")
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    old = None
    if os.path.exists(self.out):
      old = self.tmp + ".old"
      os.rename(self.out, old)
    os.rename(self.tmp, self.out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return False


def copy_modeling_code(out_dir):
  for f in spec.FILES:
    shutil.copyfile(os.path.join(HF_CODE_DIR, f), os.path.join(out_dir, f))


# --- PEFT -----------------------------------------------------------------------------

def save_peft_adapter(model, out_dir, *, base_model_name_or_path=None, overwrite=False):
  """Write the model's linjax LoRA adapters as a PEFT LoRA adapter folder:
  `adapter_config.json` + `adapter_model.safetensors` (keys
  `base_model.model.<module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r]), so
  `peft.PeftModel.from_pretrained(hf_model, out_dir)` applies them to the exported model."""
  from safetensors.numpy import save_file
  adapters = lora_adapters(model)
  if not adapters:
    raise ValueError("the model has no LoRA adapters to export")
  params = plain_params(model, lora="base")
  table = {path: name for name, (path, _) in mapping.full_name_table(model.config, params).items()}
  tensors, modules = {}, []
  ranks, scales, drops = set(), set(), set()
  for mpath, (a, b, scale, drop) in adapters.items():
    wname = table.get(mpath + ("kernel",))
    if wname is None or not wname.endswith(".weight"):
      raise UnsupportedExportError(f"LoRA on {'/'.join(map(str, mpath))}: not a linear "
                                   f"projection of the exported model")
    mod = wname[: -len(".weight")]
    modules.append(mod)
    tensors[f"base_model.model.{mod}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"base_model.model.{mod}.lora_B.weight"] = np.ascontiguousarray(b.T)
    ranks.add(a.shape[1])
    scales.add(scale)
    drops.add(drop)
  if len(ranks) > 1 or len(scales) > 1:
    raise UnsupportedExportError(f"adapters of different ranks {sorted(ranks)} / scales "
                                 f"{sorted(scales)}: PEFT's LoraConfig holds one of each")
  r, scale = ranks.pop(), scales.pop()
  # every module of a name (e.g. all q_proj) adapted: the short name; else the full names
  leaf = {m.rsplit(".", 1)[-1] for m in modules}
  every = {n[: -len(".weight")] for n in table.values()
           if n.endswith(".weight") and n[: -len(".weight")].rsplit(".", 1)[-1] in leaf}
  targets = sorted(leaf) if every == set(modules) else sorted(modules)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": scale * r,
      "lora_dropout": drops.pop() if len(drops) == 1 else 0.0, "target_modules": targets,
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path, "modules_to_save": None,
  }
  with staged_dir(out_dir, overwrite) as tmp:
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
  return os.path.abspath(os.fspath(out_dir))
