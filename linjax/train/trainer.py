"""`train(config, workdir) -> summary`: the one training loop; every recipe is a config of it.

  from linjax.train import train
  summary = train(config, "/tmp/run")      # config: ConfigDict or dict (see train/config.py)

Order of work: validate the config -> mesh -> tokenizer -> model (init_from | source), the
teacher kept frozen when an objective needs it, then linearize and the method -> data -> the
stages in order -> export -> held-out evaluation.

A stage (`linjax.train.stage`): apply LoRA if it trains LoRA, build the optimizer over its
trainable filter, and take jit-compiled steps of its objective until its step / token / time
budget is used; validation every `eval_every` steps (the best step kept when `keep_best`),
checkpoints every `ckpt_every`, metrics to TensorBoard, `metrics.jsonl` and a loss PNG.
At its end: back to the best validation step (keep_best), LoRA merged (merge_after), the
model saved as the stage's final state and the stage marked done. Layout:

  workdir/config.json                      the resolved config (a resume compares with it)
  workdir/stages/<i>_<name>/checkpoints/   orbax: model, optimizer, meta (step, data
                                           position, tokens, elapsed seconds, best)
  workdir/stages/<i>_<name>/best/          the best validation step (keep_best)
  workdir/stages/<i>_<name>/final/, DONE   the stage's end state; its summary
  workdir/stages/<i>_<name>/metrics.jsonl, tensorboard/, loss_curve.png
  workdir/model/                           the exported model (`linjax.from_pretrained`)
  workdir/summary.json, loss_curve.png     every stage, and the held-out evaluation

Resuming is automatic: the same command on the same workdir skips the finished stages
(restoring their final state) and continues the current one from its last complete
checkpoint, with the same data order and RNG, so step- and token-budgeted runs end with the
same parameters as an uninterrupted run (a time budget resumes with the time that was left).
A non-finite loss raises `NonFiniteLossError` naming the stage and step.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linjax.data import pipeline
from linjax.layers.params import param_count
from linjax.train import checkpoints as ckpt_lib
from linjax.train.checkpoints import ResumeConfigError, check_resume_config
from linjax.train import objectives as obj_lib
from linjax.train import optim as optim_lib
from linjax.train.config import (ConfigError, debug_at,
                                 ordered_stages, resolve, trainable_parts)
from linjax.train.metrics import MetricsWriter


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def _MARKER():
  """The optimizer item of a model-only checkpoint (the stage's final / best state)."""
  return nnx.State({"marker": jnp.zeros((), jnp.int32)})


# ---------------------------------------------------------------------------------------------
# Model, teacher, tokenizer

def tokenizer_name(cfg) -> str:
  tok = cfg.data.tokenizer
  if tok != "auto":
    return tok
  src = cfg.model.source
  return {"tiny": "byte", "smollm2": "smollm2"}.get(src, src)


def _model_overrides(cfg) -> dict:
  return {k: cfg.model[k] for k in ("dtype", "param_dtype", "remat", "scan_layers")
          if cfg.model[k] is not None}


def _sharding_fn(mesh):
  """(path, abstract variable) -> NamedSharding from its logical axes (for from_pretrained)."""
  from jax.sharding import NamedSharding, PartitionSpec
  from linjax.parallel.rules import logical_to_spec

  def f(path, var):
    md = var.get_metadata() if hasattr(var, "get_metadata") else {}
    names = md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")
    spec = logical_to_spec(names, var.shape, mesh) if names else PartitionSpec()
    return NamedSharding(mesh, spec)
  return f


def _load_path(path, cfg, mesh):
  import linjax
  from linjax.data.tokenizers import smollm2_gguf_path
  if path == "smollm2":
    path = smollm2_gguf_path()
  model, _ = linjax.from_pretrained(path, tokenizer=False, shardings=_sharding_fn(mesh),
                                    **_model_overrides(cfg))
  return model


def load_model(cfg, mesh):
  """The model named by `config.init_from` or `config.model`, sharded on `mesh`."""
  from linjax.parallel.rules import create_sharded
  if cfg.init_from:
    from linjax.convert.checkpoint import workdir_model
    return _load_path(workdir_model(cfg.init_from), cfg, mesh)
  if cfg.model.source != "tiny":
    return _load_path(cfg.model.source, cfg, mesh)
  from linjax.models.llama import Llama, LlamaConfig
  lc = LlamaConfig(**{**cfg.model.tiny.to_dict(), **_model_overrides(cfg)})
  return create_sharded(lambda: Llama(lc, rngs=nnx.Rngs(params=cfg.seed)), mesh)


def _reshard(model, mesh):
  from linjax.parallel.rules import param_shardings
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
  return model


def kept_softmax_layers(cfg, model, kw, train_tokens, workdir=None):
  """The layers `keep_softmax` keeps as softmax: the `keep_softmax.layers` the linearize mixer
  at initialisation replaces worst by `keep_softmax.criterion` ("transfer": the largest
  relative transfer error; "kl": the largest KL gain when restored alone;
  `linjax.linearize.select`). The choice is saved in `workdir/keep_softmax.json` and read
  back on resume."""
  from linjax.linearize import layer_ids
  from linjax.linearize.select import restore_one_gains, step0_transfer_losses, worst_layers
  ks = cfg.keep_softmax
  path = workdir and os.path.join(workdir, "keep_softmax.json")
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  n = model.config.num_hidden_layers
  candidates = layer_ids(kw.get("layers"), n)
  if int(ks.layers) >= len(candidates):
    raise ConfigError(f"config field 'keep_softmax.layers' = {int(ks.layers)} keeps all "
                      f"{len(candidates)} candidate layers of the {n}-layer model as softmax: "
                      "nothing is left to linearize")
  rest = {k: v for k, v in kw.items() if k not in ("mixer", "layers")}
  tokens = train_tokens(int(ks.seq_len))[: max(int(ks.tokens) // int(ks.seq_len), 1)]
  measure = restore_one_gains if ks.criterion == "kl" else step0_transfer_losses
  losses = measure(model, tokens, kw.get("mixer", "lolcats"), layers=candidates, **rest)
  sub = [float(losses[i]) for i in candidates]
  kept = sorted(candidates[j] for j in worst_layers(sub, int(ks.layers)))
  out = {"kept": kept, "criterion": ks.criterion,
         "losses": {int(i): float(losses[i]) for i in candidates}, "tokens": int(tokens.size)}
  if path and jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
  return out


def prepare_models(cfg, mesh, objectives, train_tokens=None, workdir=None):
  """(student, teacher or None): load, keep the teacher if needed, linearize (all but the
  `keep_softmax` layers), set methods. train_tokens(teacher, seq_len) -> [rows, seq_len]
  training tokens, for keep_softmax."""
  from linjax.linearize import linearize, set_method
  model = load_model(cfg, mesh)
  needs_teacher = (any(o.needs_teacher for o in objectives) or cfg.eval.suite != "none"
                   or int(cfg.calibrate.tokens) > 0 or int(cfg.data.teacher_text.tokens) > 0)
  teacher = None
  if needs_teacher and cfg.teacher == "auto":
    # its own buffers: the student's are donated to the train step, the teacher's are not
    teacher = nnx.clone(model)
    nnx.update(teacher, jax.tree.map(jnp.copy, nnx.state(teacher)))
  elif needs_teacher and cfg.teacher:
    teacher = _load_path(cfg.teacher, cfg, mesh)
  elif any(o.needs_teacher for o in objectives):
    raise ConfigError("an objective needs a teacher (kl / hidden_mse) but config field "
                      "'teacher' is None")
  if cfg.linearize is not None:
    kw = cfg.linearize.to_dict() if hasattr(cfg.linearize, "to_dict") else dict(cfg.linearize)
    try:
      if int(cfg.keep_softmax.layers) > 0:
        if train_tokens is None:
          raise ConfigError("config field 'keep_softmax.layers' > 0 needs training tokens")
        src = model if teacher is None else teacher
        kept = kept_softmax_layers(cfg, model, kw, lambda T: train_tokens(src, T),
                                   workdir)["kept"]
        from linjax.linearize import layer_ids
        kw["layers"] = [i for i in layer_ids(kw.get("layers"), model.config.num_hidden_layers)
                        if i not in kept]
      model = linearize(model, **kw)
    except ConfigError:
      raise
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config field 'linearize': {e}") from None
  if cfg.model.method is not None or cfg.model.attention_method is not None:
    model = set_method(model, cfg.model.method, softmax=cfg.model.attention_method)
  return _reshard(model, mesh), teacher


def export_model(model, directory: str, tokenizer=None) -> str:
  """The trained model as a linjax model folder (LoRA merged), loadable by `from_pretrained`."""
  from linjax.convert import save_linjax
  from linjax.layers.lora import lora_modules, merge_lora
  if lora_modules(model):
    merge_lora(model)
  tok = tokenizer if hasattr(tokenizer, "save_pretrained") else None
  return save_linjax(model, directory, tokenizer=tok)


# ---------------------------------------------------------------------------------------------
# Data

class Data:
  """Packed train / validation rows per sequence length, built on first use."""

  def __init__(self, cfg, tokenizer, teacher=None):
    self.cfg, self.tokenizer, self.teacher = cfg, tokenizer, teacher
    self._ids, self._packed = {}, {}

  def _tokenized(self, split):
    if split not in self._ids:
      docs = pipeline.load_documents(self.cfg.data, split)
      tt = self.cfg.data.teacher_text
      if split == "train" and int(tt.tokens) > 0:
        docs = self._with_teacher_text(docs, tt)
      self._ids[split] = pipeline.tokenize(docs, self.tokenizer, num_proc=self.cfg.data.num_proc)
    return self._ids[split]

  def _with_teacher_text(self, docs, tt):
    import datasets
    from linjax.data.teacher_text import generate_corpus
    if self.teacher is None:
      raise ConfigError("config field 'data.teacher_text.tokens' > 0 needs a teacher "
                        "(config field 'teacher')")
    key = f"{self.cfg.model.source}|{self.cfg.init_from}|{tokenizer_name(self.cfg)}"
    gen = generate_corpus(self.teacher, self.tokenizer, n_tokens=int(tt.tokens), cache_key=key,
                          seed=int(tt.seed), prompt_tokens=int(tt.prompt_tokens),
                          new_tokens=int(tt.new_tokens), temperature=float(tt.temperature),
                          top_p=float(tt.top_p), batch_size=int(tt.batch_size),
                          progress=bool(self.cfg.progress))
    extra = datasets.Dataset.from_dict({"text": [d["text"] for d in gen]})
    return datasets.concatenate_datasets([docs, extra])

  def rows(self, split, seq_len):
    key = (split, seq_len)
    if key not in self._packed:
      max_rows = self.cfg.data.max_rows if split == "train" else None
      try:
        self._packed[key] = pipeline.pack(self._tokenized(split), seq_len, max_rows=max_rows)
      except ValueError:
        if split == "train":
          raise
        self._packed[key] = None      # held-out split too small for one row
    return self._packed[key]


# ---------------------------------------------------------------------------------------------
# Steps

def make_train_step(graphdef, distill_gdef, teacher_gdef, wrt, objective, *, accum, plateau,
                    state_sh, batch_sh, teacher_sh=None, nan_step=-1):
  """jit(step(state, teacher_state, batch, step, lr) -> (state, metrics)).

  state is nnx.state((model, optimizer)); distill_gdef (or None) splits the same weights
  into the model in distill mode; the teacher is a frozen (graphdef, state)."""

  def step_fn(state, teacher_state, batch, step, lr):
    model, optimizer = nnx.merge(graphdef, state)
    optim_lib.set_learning_rate(optimizer, lr)
    mgdef, params, rest = nnx.split(model, wrt, ...)
    teacher = None if teacher_gdef is None else nnx.merge(teacher_gdef, teacher_state)

    def f(params, rest, mb):
      m = nnx.merge(mgdef, params, rest, copy=True)   # fresh Variables at this trace level
      d = None if distill_gdef is None else nnx.merge(distill_gdef, params, rest, copy=True)
      loss, met = objective(m, d, teacher, mb)
      if nan_step >= 0:
        loss = loss * jnp.where(step == nan_step, jnp.nan, 1.0)
      _, _, new_rest = nnx.split(m, wrt, ...)
      return loss, (met, new_rest)

    grad_fn = jax.value_and_grad(f, has_aux=True)
    if accum == 1:
      (loss, (met, rest)), grads = grad_fn(params, rest, batch)
    else:
      # micro-batch i takes rows i, i + accum, ...: every device contributes to each one;
      # gradients are weighted by their token counts, so the update equals the whole batch's
      mbs = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
                         .swapaxes(0, 1), batch)

      def body(carry, mb):
        g_acc, l_acc, w_acc, rest = carry
        (l, (met, rest)), g = grad_fn(params, rest, mb)
        w = met["tokens"].astype(jnp.float32)
        g_acc = jax.tree.map(lambda a, b: a + w * b, g_acc, g)
        return (g_acc, l_acc + w * l, w_acc + w, rest), met

      zeros = jax.tree.map(jnp.zeros_like, params)
      z = jnp.zeros((), jnp.float32)
      (grads, loss, wsum, rest), mets = jax.lax.scan(body, (zeros, z, z, rest), mbs)
      wsum = jnp.maximum(wsum, 1e-9)
      grads = jax.tree.map(lambda g: g / wsum, grads)
      loss = loss / wsum
      met = {k: (v.sum() if k == "tokens" else v.mean()) for k, v in mets.items()}
    nnx.update(model, rest)
    optimizer.update(model, grads, **({"value": loss} if plateau else {}))
    metrics = dict(met, loss=loss, grad_norm=optax_global_norm(grads), lr=lr)
    return nnx.state((model, optimizer)), metrics

  return jax.jit(step_fn, in_shardings=(state_sh, teacher_sh, batch_sh, None, None),
                 out_shardings=(state_sh, None), donate_argnums=(0,))


def optax_global_norm(tree):
  import optax
  return optax.global_norm(tree)


def make_eval_step(graphdef, distill_gdef, teacher_gdef, objective, state_sh, batch_sh,
                   teacher_sh=None):
  """jit(eval(state, teacher_state, batch) -> (loss * tokens, tokens)) of the objective."""
  def eval_fn(state, teacher_state, batch):
    model, _ = nnx.merge(graphdef, state)
    teacher = None if teacher_gdef is None else nnx.merge(teacher_gdef, teacher_state)
    d = None
    if distill_gdef is not None:
      _, params, rest = nnx.split(model, nnx.Param, ...)
      d = nnx.merge(distill_gdef, params, rest)
    loss, met = objective(model, d, teacher, batch)
    return loss * met["tokens"], met["tokens"]
  return jax.jit(eval_fn, in_shardings=(state_sh, teacher_sh, batch_sh))


def validate(eval_step, state, teacher_state, rows, batch_size, max_rows, to_global):
  """Mean of the objective over the first `max_rows` validation rows (token-weighted)."""
  tot, n = 0.0, 0.0
  for b in pipeline.eval_batches(rows, batch_size, max_rows):
    r = b["input_ids"].shape[0]
    if r < batch_size:   # pad with fully masked rows to keep one compiled shape
      b = {k: np.concatenate([v, np.zeros((batch_size - r,) + v.shape[1:], v.dtype)])
           for k, v in b.items()}
    s, c = eval_step(state, teacher_state, to_global(b))
    tot += float(s)
    n += float(c)
  return tot / max(n, 1.0)


# ---------------------------------------------------------------------------------------------
# One stage

class Stage:
  """Everything of stage i: its directory, objective, optimizer, steps, data iterator."""

  def __init__(self, run, index, name, scfg):
    self.run, self.index, self.name, self.cfg = run, index, name, scfg
    self.dir = os.path.join(run.workdir, "stages", f"{index}_{name}")
    self.objective = obj_lib.make_objective(dict(scfg.objective),
                                            kl_temperature=float(scfg.kl_temperature),
                                            transfer_scale=float(scfg.transfer_scale),
                                            loss_chunk=int(scfg.loss_chunk))
    self.parts = trainable_parts(scfg.trainable)

  @property
  def done_path(self):
    return os.path.join(self.dir, "DONE")

  def is_done(self):
    return os.path.exists(self.done_path)

  # --- structure: LoRA in, LoRA out ------------------------------------------------------
  def apply_lora(self, model):
    from linjax.layers.lora import apply_lora, lora_modules
    if "lora" in self.parts and not lora_modules(model):
      l = self.cfg.lora
      apply_lora(model, rank=int(l.rank), alpha=float(l.alpha), dropout=float(l.dropout),
                 targets=tuple(l.targets),
                 rngs=nnx.Rngs(params=self.run.cfg.seed + 101 * (self.index + 1),
                               dropout=self.run.cfg.seed + 103 * (self.index + 1)))
      _reshard(model, self.run.mesh)

  def finish_structure(self, model):
    from linjax.layers.lora import lora_modules, merge_lora
    if "lora" in self.parts and self.cfg.lora.merge_after and lora_modules(model):
      merge_lora(model)

  # --- final state ----------------------------------------------------------------------
  def _final_ckpt(self):
    return ckpt_lib.Checkpointer(os.path.join(self.dir, "final"), keep=1, async_save=False)

  def save_final(self, model, summary):
    ck = self._final_ckpt()
    try:
      ck.save(0, nnx.state(model), _MARKER(), {"summary": summary})
      ck.wait()
    finally:
      ck.close()
    tmp = self.done_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=1, default=str)
    os.replace(tmp, self.done_path)

  def restore_final(self, model):
    ck = self._final_ckpt()
    try:
      nnx.update(model, ck.restore_model(0, nnx.state(model)))
    finally:
      ck.close()
    with open(self.done_path) as f:
      return json.load(f)

  # --- the loop ---------------------------------------------------------------------------
  def train(self, model, teacher):
    from linjax.linearize import set_distill
    from linjax.parallel.mesh import use_mesh
    from linjax.parallel.rules import batch_sharding, param_shardings
    run, s = self.run, self.cfg
    self.apply_lora(model)
    wrt = optim_lib.trainable_filter(s.trainable)
    n_trainable = param_count(model, wrt)
    if n_trainable == 0:
      raise ConfigError(f"config field 'stages.{self.name}.trainable'={s.trainable!r} selects no "
                        "parameter of this model")
    optimizer = nnx.Optimizer(model, optim_lib.make_optimizer(s.optim), wrt=wrt)
    graphdef, state = nnx.split((model, optimizer))
    state_sh = param_shardings(state, run.mesh)
    state = jax.device_put(state, state_sh)
    distill_gdef = None
    if self.objective.distill_kind:
      # the same weights, split by the same filters, merge into the distill-mode structure
      distill_gdef = nnx.graphdef(set_distill(nnx.clone(model), self.objective.distill_kind))
    seq, gb, top_k = int(s.seq_len), int(s.batch_size), int(s.kl_top_k)
    bsh = batch_sharding(run.mesh, 2, (gb, seq))
    batch_sh = {k: bsh for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
    cache = None
    if top_k:   # the teacher's top-k from the cache: the train step runs no teacher for kl
      from linjax.train.teacher_cache import KEYS, TeacherTopK
      if teacher is None:
        raise ConfigError(f"config field 'stages.{self.name}.kl_top_k' > 0 needs a teacher "
                          "(config field 'teacher')")
      cache = TeacherTopK(run.cfg.teacher_cache or os.path.join(run.workdir, "teacher_topk"),
                          teacher, top_k, float(s.kl_temperature), int(s.loss_chunk), run.mesh)
      ksh = batch_sharding(run.mesh, 3, (gb, seq, top_k))
      batch_sh.update({KEYS[0]: ksh, KEYS[1]: ksh, KEYS[2]: bsh})
    teacher_gdef = teacher_state = teacher_sh = None
    if self.objective.needs_teacher and not (cache and "hidden_mse" not in self.objective.weights):
      teacher_gdef, teacher_state = nnx.split(teacher)
      teacher_sh = param_shardings(teacher_state, run.mesh)
    to_global = lambda b: run.to_global(cache.attach(b) if cache else b)
    train_rows = run.data.rows("train", seq)
    val_rows = run.data.rows("eval", seq)

    # checkpoints and resume
    ck = ckpt_lib.Checkpointer(os.path.join(self.dir, "checkpoints"), keep=int(run.cfg.ckpt.keep),
                               async_save=bool(run.cfg.ckpt.async_save))
    best_ck = None
    save_filter = nnx.Any(wrt, nnx.Not(nnx.Param)) if run.cfg.ckpt.trainable_only else ...
    start, position, tokens, elapsed, best = 0, 0, 0, 0.0, None
    model, optimizer = nnx.merge(graphdef, state)
    # the newest step whose arrays read back with their checksums (damaged ones are named)
    restored = ck.restore_latest_intact(nnx.state(model, save_filter), nnx.state(optimizer))
    latest = None if restored is None else restored[0]
    if restored is not None:
      _, ms, os_, meta = restored
      nnx.update(model, ms)
      nnx.update(optimizer, os_)
      state = jax.device_put(nnx.state((model, optimizer)), state_sh)
      start, position = int(meta["step"]), int(meta["data_position"])
      tokens, elapsed, best = int(meta["tokens"]), float(meta["elapsed_s"]), meta.get("best")
    it = pipeline.DataIterator(train_rows, gb, seed=run.cfg.seed + 1000 * self.index,
                               shuffle=bool(run.cfg.data.shuffle), position=position)
    plateau = s.optim.schedule == "plateau"
    nan = debug_at(run.cfg, "debug_nan_at")
    kill = debug_at(run.cfg, "debug_kill_at")
    train_step = make_train_step(
        graphdef, distill_gdef, teacher_gdef, wrt, self.objective, accum=int(s.grad_accum),
        plateau=plateau, state_sh=state_sh, batch_sh=batch_sh, teacher_sh=teacher_sh,
        nan_step=nan[1] if nan and nan[0] == self.name else -1)
    eval_step = make_eval_step(graphdef, distill_gdef, teacher_gdef, self.objective, state_sh,
                               batch_sh, teacher_sh)
    steps = int(s.steps)
    max_tokens, budget = int(s.tokens), float(s.time_budget_s)
    # the bar counts steps; with a token / time budget the step count is not known ahead
    bar_total = steps if not (max_tokens or budget) else (max_tokens // (gb * seq) or None)
    writer = MetricsWriter(self.dir, bar_total, start, enabled=run.is_main,
                           progress=bool(run.cfg.progress),
                           resume_step=start if latest is not None else None)
    tok_per_step = gb * seq

    def progress_of(step, tokens, elapsed):
      p = step / max(steps, 1)
      if max_tokens:
        p = max(p, tokens / max_tokens)
      if budget:
        p = max(p, elapsed / budget)
      return p

    def save(step):
      model, optimizer = nnx.merge(graphdef, state)
      ck.save(step, nnx.state(model, save_filter), nnx.state(optimizer),
              {"step": int(step), "data_position": int(it.position), "tokens": int(tokens),
               "elapsed_s": float(elapsed), "best": best, "stage": self.name,
               "config": run.cfg.to_json()})

    def run_val(step):
      nonlocal best, best_ck
      if val_rows is None:
        return None
      v = validate(eval_step, state, teacher_state, val_rows, gb, int(s.eval_rows), to_global)
      writer.write(step, {"loss": v}, "val")
      if s.keep_best and (best is None or v < best["loss"]):
        best = {"step": int(step), "loss": float(v)}
        if best_ck is None:
          best_ck = ckpt_lib.Checkpointer(os.path.join(self.dir, "best"), keep=1,
                                          async_save=False)
        model, _ = nnx.merge(graphdef, state)
        best_ck.save(step, nnx.state(model, save_filter), _MARKER(), {"best": best})
        best_ck.wait()
      return v

    history, acc, acc_n, last_loss, last_val = [], {}, 0, None, None
    t_first = None          # the first step in this process includes compilation
    step = start
    t_stage = time.time()
    try:
      with use_mesh(run.mesh):
        while step < steps and not (max_tokens and tokens >= max_tokens) and not (
            budget and elapsed >= budget):
          t0 = time.time()    # the batch counts too: with kl_top_k it may run the teacher
          batch = to_global(next(it))
          lr = optim_lib.learning_rate(s.optim, step, progress_of(step, tokens, elapsed))
          if t_first is None:
            writer.message(f"stage {self.name}: compiling the train step "
                           f"({model.config.num_hidden_layers}-layer model, {gb} x {seq} "
                           "tokens); the first step includes it")
          state, metrics = train_step(state, teacher_state, batch, jnp.asarray(step, jnp.int32),
                                      jnp.asarray(lr, jnp.float32))
          loss = float(metrics["loss"])
          if not math.isfinite(loss):
            ck.wait()
            good = ck.latest_step()
            raise NonFiniteLossError(
                f"non-finite training loss ({loss}) in stage {self.name!r} at step {step}; "
                f"stopping. Last good checkpoint: "
                f"{'none' if good is None else f'step {good}'} in {ck.directory}")
          now = time.time()
          if t_first is None:
            t_first = now
            writer.message(f"stage {self.name}: compiled, first step done in {now - t0:.0f} s")
          else:
            elapsed += now - t0
          step += 1
          tokens += tok_per_step
          last_loss = loss
          history.append(loss)
          for k, v in metrics.items():
            acc[k] = acc.get(k, 0.0) + float(v)
          acc_n += 1
          writer.progress(1, loss=loss, lr=f"{lr:.2g}",
                          **({"left": f"{max(budget - elapsed, 0):.0f}s"} if budget else {}))
          if step % int(s.log_every) == 0 or step == steps:
            writer.write(step, {k: v / acc_n for k, v in acc.items()})
            acc, acc_n = {}, 0
          if s.eval_every and step % int(s.eval_every) == 0:
            last_val = run_val(step)
          if s.ckpt_every and step % int(s.ckpt_every) == 0:
            save(step)
          if kill and kill == (self.name, step):
            ck.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if acc_n:
          writer.write(step, {k: v / acc_n for k, v in acc.items()})
        if not s.eval_every or step % int(s.eval_every):
          last_val = run_val(step)
        save(step)
    finally:
      writer.close()
      ck.close()
    model, optimizer = nnx.merge(graphdef, state)
    if s.keep_best and best is not None and best["step"] != step:
      bck = ckpt_lib.Checkpointer(os.path.join(self.dir, "best"), keep=1, async_save=False)
      try:
        nnx.update(model, bck.restore_model(bck.latest_step(), nnx.state(model, save_filter)))
      finally:
        bck.close()
    if best_ck is not None:
      best_ck.close()
    self.finish_structure(model)
    writer.plot()
    return model, {
        "stage": self.name, "steps": step, "tokens": tokens, "seconds": time.time() - t_stage,
        "train_seconds": elapsed, "final_loss": last_loss,
        "first_loss": history[0] if history else None, "val_loss": last_val, "best": best,
        "trainable": s.trainable, "trainable_params": n_trainable,
        "objective": dict(s.objective), "resumed_at": start or None,
        "teacher_cache": None if cache is None else {
            "dir": cache.directory, "k": top_k, "hits": cache.hits, "misses": cache.misses}}


# ---------------------------------------------------------------------------------------------
# The run

def generate_samples(model, teacher, tokenizer, prompts, max_new_tokens, context=8192):
  """Greedy continuations of `prompts` by the student (its decode state: the recurrent state
  of linear layers, the window ring of hybrids), and the decode-state size of the student and
  of the teacher's KV cache at `context` tokens; `student_growing_mib` is the part of the
  student's that grows with the context (the KV cache of layers kept as softmax)."""
  from linjax.generate import decode_state_mib, generate_text
  texts = generate_text(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                        temperature=0.0)
  at, twice = decode_state_mib(model, context), decode_state_mib(model, 2 * context)
  out = {"samples": dict(zip(prompts, texts)), "context": context,
         "student_state_mib": at, "student_growing_mib": twice - at}
  if teacher is not None:
    out["teacher_kv_cache_mib"] = decode_state_mib(teacher, context)
  return out


def plot_stages(path, stages):
  """One PNG of every stage's training (and validation) loss against its steps."""
  from matplotlib.figure import Figure   # no pyplot: leaves the caller's backend alone
  fig = Figure(figsize=(4.5 * len(stages), 3.6))
  axes = fig.subplots(1, len(stages), squeeze=False)
  for ax, st in zip(axes[0], stages):
    h = MetricsWriter(st.dir, 0, 0, enabled=False).history()
    tr = sorted(h.get("train", {}).items())
    if tr:
      ax.plot([k for k, _ in tr], [r["loss"] for _, r in tr], lw=1, label="train")
    va = sorted((k, r) for k, r in h.get("val", {}).items() if "loss" in r)
    if va:
      ax.plot([k for k, _ in va], [r["loss"] for _, r in va], "o-", label="validation")
    ax.set_title(f"{st.index + 1}. {st.name} ({'+'.join(k for k in st.objective.weights)})")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("loss")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


class Run:
  def __init__(self, cfg, workdir):
    from linjax.parallel.distributed import host_local_to_global
    from linjax.parallel.mesh import make_mesh
    self.cfg, self.workdir = cfg, workdir
    self.mesh = make_mesh(cfg.mesh)
    self.is_main = jax.process_index() == 0
    self.n_stages = len(cfg.stages)
    self.to_global = lambda b: host_local_to_global(b, self.mesh)


def _check_saved_config(cfg, workdir):
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    try:
      check_resume_config(saved, json.loads(cfg.to_json()), allow=bool(cfg.allow_config_change))
    except ResumeConfigError as e:
      raise ConfigError(
          f"{workdir} holds a run with a different config: {'; '.join(e.fields)}; use another "
          "workdir, or pass --config.allow_config_change=True to resume anyway") from None
  elif jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(cfg.to_json(indent=1))
    os.replace(tmp, path)


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the run of `config` in `workdir`; returns the summary dict.

  The summary (also written to `workdir/summary.json`, without "model") holds each stage's
  summary, the held-out evaluation when `eval.suite` is set, where the model was exported,
  and "model": the trained model object (LoRA merged when exported).
  """
  from linjax.data.tokenizers import load_tokenizer
  from linjax.parallel.mesh import use_mesh
  t_start = time.time()
  cfg = resolve(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _check_saved_config(cfg, workdir)
  run = Run(cfg, workdir)
  tokenizer = load_tokenizer(tokenizer_name(cfg))
  stages = [Stage(run, i, name, s) for i, (name, s) in enumerate(ordered_stages(cfg))]
  run.data = Data(cfg, tokenizer)

  def train_tokens(teacher, seq_len):
    run.data.teacher = teacher
    return run.data.rows("train", seq_len).tokens

  with use_mesh(run.mesh):
    model, teacher = prepare_models(cfg, run.mesh, [st.objective for st in stages],
                                    train_tokens=train_tokens, workdir=workdir)
  run.data.teacher = teacher
  vocab = model.config.vocab_size
  if len(tokenizer) > vocab:
    raise ConfigError(f"tokenizer {tokenizer_name(cfg)!r} has {len(tokenizer)} tokens but the "
                      f"model only {vocab} (config field 'data.tokenizer' / 'model')")
  if int(cfg.calibrate.tokens) > 0:
    from linjax.linearize.calibrate import calibrate
    rows = run.data.rows("train", min(512, int(cfg.calibrate.tokens)))
    n = max(int(cfg.calibrate.tokens) // rows.seq_len, 1)
    calibrate(model, teacher, rows.tokens[:n])
  results = []
  for st in stages:
    if st.is_done():     # rebuild the stage's end structure, then its saved state
      st.apply_lora(model)
      st.finish_structure(model)
      results.append(st.restore_final(model))
      continue
    if int(st.cfg.steps) == 0:
      summary = {"stage": st.name, "steps": 0, "skipped": True}
    else:
      model, summary = st.train(model, teacher)
    if run.is_main:
      st.save_final(model, summary)
    results.append(summary)
  model_dir = None
  if cfg.ckpt.export:
    model_dir = export_model(model, os.path.join(workdir, "model"),
                             tokenizer if run.is_main else None)
  evaluation = None
  if cfg.eval.suite != "none":
    from linjax.eval.suite import evaluate_run
    evaluation = evaluate_run(model, teacher, tokenizer, suite=cfg.eval.suite,
                              baselines=tuple(cfg.eval.baselines), workdir=workdir,
                              progress=bool(cfg.progress))
  generations = None
  if cfg.eval.prompts and run.is_main:
    generations = generate_samples(model, teacher, tokenizer, tuple(cfg.eval.prompts),
                                   int(cfg.eval.max_new_tokens))
  summary = {"workdir": workdir, "stages": results, "model_dir": model_dir,
             "evaluation": evaluation, "generations": generations, "total_params": param_count(model),
             "devices": jax.device_count(), "mesh": dict(run.mesh.shape),
             "wall_s": time.time() - t_start, "config": cfg.to_dict()}
  if run.is_main:
    plot_stages(os.path.join(workdir, "loss_curve.png"), stages)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1, default=str)
  summary["model"] = model
  return summary
