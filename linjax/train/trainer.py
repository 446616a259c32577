"""`train(config, workdir) -> summary`: the one training loop behind every recipe.

  from linjax.train import train
  summary = train(config, "/tmp/run")      # config: ConfigDict or dict (see train/config.py)

Order of work: validate the config (unknown fields, missing paths) -> build the mesh ->
tokenizer -> model (init_from | source), then linearize, then LoRA -> data -> optimizer on
the trainable filter -> restore the latest checkpoint in `workdir/checkpoints` if any ->
jit-compiled steps with explicit shardings -> periodic eval / checkpoints -> export.

Resuming is automatic: the same command on the same workdir continues from the last
complete checkpoint (model, optimizer, step, data position, RNG key) and produces the same
parameters as an uninterrupted run. A non-finite loss raises `NonFiniteLossError` naming
the step; checkpoints written before it stay.
"""
from __future__ import annotations

import importlib.util
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from linjax.train import checkpoints as ckpt_lib
from linjax.train import data as data_lib
from linjax.train import losses as losses_lib
from linjax.train import optim as optim_lib
from linjax.train.config import ConfigError, resolve, trainable_parts
from linjax.train.metrics import MetricsWriter


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Model, tokenizer

def tokenizer_name(cfg) -> str:
  tok = cfg.data.tokenizer
  if tok != "auto":
    return tok
  src = cfg.model.source
  if src == "tiny":
    return "byte"
  if src == "smollm2":
    return "smollm2"
  return src


def _model_overrides(cfg) -> dict:
  return {k: cfg.model[k] for k in ("dtype", "param_dtype", "remat") if cfg.model[k] is not None}


def _find_run_checkpoint(path: str):
  """(checkpoints dir, step or None) when `path` is a run's workdir, its checkpoints/ dir or
  one step dir in it; None otherwise."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  name, parent = os.path.basename(path), os.path.dirname(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "meta")):
    return parent, int(name)
  if any(d.isdigit() for d in os.listdir(path)):
    return path, None
  return None


def _load_from_run(path: str, mesh):
  """The model of a previous run's checkpoint: rebuilt from the config saved with it (its own
  source / init_from, linearize, LoRA), then its saved weights restored, LoRA merged."""
  import json
  from linjax.layers.lora import lora_modules, merge_lora
  ckdir, step = _find_run_checkpoint(path)
  ck = ckpt_lib.Checkpointer(ckdir, async_save=False)
  try:
    step = ck.latest_step() if step is None else step
    if step is None:
      raise ConfigError(f"config field 'init_from': no complete checkpoint in {ckdir}")
    prev = resolve(json.loads(ck.read_meta(step)["config"]))
    model = prepare_model(prev, mesh)
    flt = (nnx.Any(optim_lib.trainable_filter(prev.trainable), nnx.Not(nnx.Param))
           if prev.ckpt.trainable_only else ...)
    nnx.update(model, ck.restore_model(step, nnx.state(model, flt)))
  finally:
    ck.close()
  if lora_modules(model):
    merge_lora(model)
  return model


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


def load_model(cfg, mesh):
  """The model named by `config.init_from` or `config.model`, its parameters sharded on `mesh`."""
  from linjax.parallel.rules import create_sharded
  over = _model_overrides(cfg)
  if cfg.init_from:
    path = cfg.init_from
    if os.path.isdir(os.path.join(path, "model")) and not os.path.exists(
        os.path.join(path, "config.json")):
      path = os.path.join(path, "model")          # a workdir with an exported model
    elif not os.path.exists(os.path.join(path, "config.json")) and _find_run_checkpoint(path):
      return _load_from_run(path, mesh)          # a workdir / checkpoint without an export
  else:
    path = cfg.model.source
  if path != "tiny":
    import linjax
    if path == "smollm2":
      path = data_lib.smollm2_gguf_path()
    model, _ = linjax.from_pretrained(path, tokenizer=False, shardings=_sharding_fn(mesh),
                                      **over)
    return model
  from linjax.models.llama import Llama, LlamaConfig
  lc = LlamaConfig(**{**cfg.model.tiny.to_dict(), **over})
  return create_sharded(lambda: Llama(lc, rngs=nnx.Rngs(params=cfg.seed)), mesh)


def prepare_model(cfg, mesh):
  """load -> linearize (if configured) -> LoRA (if trained); returns the model."""
  model = load_model(cfg, mesh)
  if cfg.linearize is not None:
    if importlib.util.find_spec("linjax.linearize") is None:
      raise ConfigError("config field 'linearize' is set but linjax.linearize is not available")
    from linjax.linearize import linearize
    kw = cfg.linearize.to_dict() if hasattr(cfg.linearize, "to_dict") else dict(cfg.linearize)
    out = linearize(model, **kw)
    model = out if isinstance(out, nnx.Module) else model
  if "lora" in trainable_parts(cfg.trainable):
    from linjax.layers.lora import apply_lora
    apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               targets=tuple(cfg.lora.targets),
               rngs=nnx.Rngs(params=cfg.seed + 1, dropout=cfg.seed + 2))
  # Reshard everything (new linearization / LoRA params included) onto the mesh.
  from linjax.parallel.rules import param_shardings
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
  return model


def export_model(model, directory: str, tokenizer=None) -> str:
  """The trained model as a linjax model folder (LoRA merged), loadable by `from_pretrained`."""
  from linjax.layers.lora import lora_modules, merge_lora
  if lora_modules(model):
    merge_lora(model)
  from linjax.convert import save_linjax
  tok = tokenizer if hasattr(tokenizer, "save_pretrained") else None
  return save_linjax(model, directory, tokenizer=tok)


# ---------------------------------------------------------------------------------------------
# Data

def load_data(cfg, tokenizer):
  cache = {}

  def packed(split):
    docs = data_lib.load_documents(cfg.data, split)
    ids = data_lib.tokenize(docs, tokenizer, num_proc=cfg.data.num_proc)
    max_rows = cfg.data.max_rows if split == "train" else None
    return data_lib.pack(ids, cfg.data.seq_len, max_rows=max_rows)

  cache["train"] = packed("train")
  try:
    cache["eval"] = packed("eval")
  except ValueError:   # held-out split too small for one row
    cache["eval"] = None
  return cache["train"], cache["eval"]


# ---------------------------------------------------------------------------------------------
# Steps

def make_train_step(graphdef, wrt, cfg, schedule, state_sh, batch_sh):
  loss_kw = {k: v for k, v in cfg.loss.to_dict().items() if k != "name"}
  loss_impl = losses_lib.get_loss(cfg.loss.name)
  accum = int(cfg.optim.grad_accum)
  nan_step = int(cfg.debug_nan_at_step)
  plateau = cfg.optim.schedule == "plateau"

  def step_fn(state, batch, rng, step):
    model, optimizer = nnx.merge(graphdef, state)
    mgdef, params, rest = nnx.split(model, wrt, ...)

    def f(params, rest, mb, key):
      m = nnx.merge(mgdef, params, rest, copy=True)   # fresh Variables at this trace level
      loss, met = loss_impl(m, mb, key, **loss_kw)
      if nan_step >= 0:
        loss = loss * jnp.where(step == nan_step, jnp.nan, 1.0)
      _, _, new_rest = nnx.split(m, wrt, ...)
      return loss, (met, new_rest)

    grad_fn = jax.value_and_grad(f, has_aux=True)
    if accum == 1:
      (loss, (met, rest)), grads = grad_fn(params, rest, batch, rng)
    else:
      # micro-batch i takes rows i, i + accum, ...: every device contributes to each one
      mbs = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
                         .swapaxes(0, 1), batch)

      # Micro-batch gradients are weighted by their token counts (when the loss reports
      # "tokens"), so the update equals the one of the whole batch at once.
      def body(carry, xs):
        g_acc, l_acc, w_acc, rest = carry
        mb, i = xs
        (l, (met, rest)), g = grad_fn(params, rest, mb, jax.random.fold_in(rng, i))
        w = met["tokens"].astype(jnp.float32) if "tokens" in met else jnp.float32(1.0)
        g_acc = jax.tree.map(lambda a, b: a + w * b, g_acc, g)
        return (g_acc, l_acc + w * l, w_acc + w, rest), met

      zeros = jax.tree.map(jnp.zeros_like, params)
      z = jnp.zeros((), jnp.float32)
      (grads, loss, wsum, rest), mets = jax.lax.scan(
          body, (zeros, z, z, rest), (mbs, jnp.arange(accum)))
      wsum = jnp.maximum(wsum, 1e-9)
      grads = jax.tree.map(lambda g: g / wsum, grads)
      loss = loss / wsum
      met = {k: (v.sum() if k == "tokens" else v.mean()) for k, v in mets.items()}
    nnx.update(model, rest)
    extra = {"value": loss} if plateau else {}
    optimizer.update(model, grads, **extra)
    metrics = dict(met)
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(step))
    return nnx.state((model, optimizer)), metrics

  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, None, None),
                 out_shardings=(state_sh, None), donate_argnums=(0,))


def make_eval_step(graphdef, state_sh, batch_sh):
  def eval_fn(state, batch):
    model, _ = nnx.merge(graphdef, state)
    if hasattr(model, "eval"):
      model.eval()
    logits = losses_lib.model_logits(model, batch)
    return losses_lib.masked_token_ce(logits, batch["targets"], batch["loss_mask"])
  return jax.jit(eval_fn, in_shardings=(state_sh, batch_sh))


def evaluate_heldout(eval_step, state, eval_data, batch_size, max_rows, mesh, to_global):
  """Held-out mean token cross-entropy and perplexity over the first `max_rows` rows."""
  nll, n = 0.0, 0.0
  for b in data_lib.eval_batches(eval_data, batch_size, max_rows):
    rows = b["input_ids"].shape[0]
    if rows < batch_size:  # pad with fully masked rows to keep one compiled shape
      b = {k: np.concatenate([v, np.zeros((batch_size - rows,) + v.shape[1:], v.dtype)])
           for k, v in b.items()}
    s, c = eval_step(state, to_global(b))
    nll += float(s)
    n += float(c)
  loss = nll / max(n, 1.0)
  return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}


# ---------------------------------------------------------------------------------------------
# The loop

def _meta(cfg, step, position, key, loss):
  return {"step": int(step), "data_position": int(position),
          "rng_key": [int(x) for x in np.asarray(jax.random.key_data(key)).reshape(-1)],
          "loss": None if loss is None else float(loss), "config": cfg.to_json()}


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the training run of `config` in `workdir`; returns the summary dict.

  The summary (also written to `workdir/summary.json`, without "model") holds the final
  train loss, held-out loss / perplexity, tokens/s (after the compiling first step),
  parameter counts, where it resumed from, the resolved config, and "model": the trained
  model object (with LoRA merged when `ckpt.export` is on).
  """
  from linjax.parallel.mesh import make_mesh, use_mesh
  from linjax.parallel.rules import batch_sharding, param_shardings
  from linjax.parallel.distributed import host_local_to_global

  t_start = time.time()
  cfg = resolve(config)                       # every field and path checked before compute
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(cfg.mesh)
  is_main = jax.process_index() == 0

  tokenizer = data_lib.load_tokenizer(tokenizer_name(cfg))
  with use_mesh(mesh):
    model = prepare_model(cfg, mesh)
  vocab = model.config.vocab_size
  tok_vocab = len(tokenizer)
  if tok_vocab > vocab:
    raise ConfigError(f"tokenizer {tokenizer_name(cfg)!r} has {tok_vocab} tokens but the model "
                      f"only {vocab} (config field 'data.tokenizer' / 'model')")
  train_data, eval_data = load_data(cfg, tokenizer)

  wrt = optim_lib.trainable_filter(cfg.trainable)
  n_trainable = optim_lib.count_params(model, wrt)
  n_total = optim_lib.count_params(model)
  if n_trainable == 0:
    raise ConfigError(f"config field 'trainable'={cfg.trainable!r} selects no parameter of "
                      "this model")
  tx, schedule = optim_lib.make_optimizer(cfg.optim, int(cfg.steps))
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  state_sh = param_shardings(state, mesh)
  state = jax.device_put(state, state_sh)

  seq_len, gb = int(cfg.data.seq_len), int(cfg.data.batch_size)
  bsh = batch_sharding(mesh, 2, (gb, seq_len))
  batch_sh = {k: bsh for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}

  def to_global(b):
    return host_local_to_global(b, mesh)

  # Checkpoints and resume.
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(cfg.ckpt.keep),
                             async_save=bool(cfg.ckpt.async_save))
  save_filter = nnx.Any(wrt, nnx.Not(nnx.Param)) if cfg.ckpt.trainable_only else ...
  base_key = jax.random.key(int(cfg.seed))
  start, position, resumed_from = 0, 0, None
  latest = ck.latest_step()
  if latest is not None:
    model, optimizer = nnx.merge(graphdef, state)
    ms, os_ = nnx.state(model, save_filter), nnx.state(optimizer)
    ms, os_, meta = ck.restore(latest, ms, os_)
    nnx.update(model, ms)
    nnx.update(optimizer, os_)
    state = jax.device_put(nnx.state((model, optimizer)), state_sh)
    start, position, resumed_from = int(meta["step"]), int(meta["data_position"]), latest
    base_key = jax.random.wrap_key_data(np.asarray(meta["rng_key"], np.uint32),
                                        impl=jax.random.key_impl(base_key))

  it = data_lib.DataIterator(train_data, gb, seed=int(cfg.seed), shuffle=bool(cfg.data.shuffle),
                             position=position)
  train_step = make_train_step(graphdef, wrt, cfg, schedule, state_sh, batch_sh)
  eval_step = make_eval_step(graphdef, state_sh, batch_sh)
  writer = MetricsWriter(workdir, int(cfg.steps), start, enabled=is_main,
                         progress=bool(cfg.progress))
  steps, log_every = int(cfg.steps), max(int(cfg.log_every), 1)
  every = int(cfg.ckpt.every)
  tokens_per_step = gb * seq_len

  def save(step, loss):
    model, optimizer = nnx.merge(graphdef, state)
    ck.save(step, nnx.state(model, save_filter), nnx.state(optimizer),
            _meta(cfg, step, it.position, base_key, loss))

  def run_eval(step):
    if eval_data is None:
      return None
    r = evaluate_heldout(eval_step, state, eval_data, gb, int(cfg.data.eval_rows) or None,
                         mesh, to_global)
    writer.write(step, r, "eval")
    return r

  last_loss, last_eval, acc, acc_n, t_measure, measured_steps = None, None, {}, 0, None, 0
  t_loop = time.time()
  try:
    with use_mesh(mesh):
      for step in range(start, steps):
        batch = to_global(next(it))
        rng = jax.random.fold_in(base_key, step)
        state, metrics = train_step(state, batch, rng, jnp.asarray(step, jnp.int32))
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
          ck.wait()
          good = ck.latest_step()
          raise NonFiniteLossError(
              f"non-finite training loss ({loss}) at step {step}; stopping. "
              f"Last good checkpoint: {'none' if good is None else f'step {good}'} in "
              f"{ck.directory}")
        last_loss = loss
        now = time.time()
        if t_measure is None:           # the first step in this process includes compilation
          t_measure = now
        else:
          measured_steps += 1
        for k, v in metrics.items():
          acc[k] = acc.get(k, 0.0) + float(v)
        acc_n += 1
        done = step + 1
        tps = (measured_steps * tokens_per_step / (now - t_measure)) if measured_steps else 0.0
        writer.progress(1, loss=loss, **({"tok/s": f"{tps:,.0f}"} if tps else {}))
        if done % log_every == 0 or done == steps:
          writer.write(done, {**{k: v / acc_n for k, v in acc.items()}, "tokens_per_s": tps})
          acc, acc_n = {}, 0
        if cfg.eval_every and done % int(cfg.eval_every) == 0 and done != steps:
          last_eval = run_eval(done)
        if (every and done % every == 0) or done == steps:
          save(done, loss)
        if cfg.debug_kill_at_step >= 0 and done == int(cfg.debug_kill_at_step):
          os.kill(os.getpid(), signal.SIGKILL)
      last_eval = run_eval(steps)
  finally:
    writer.close()
    ck.close()

  wall = time.time() - t_loop
  model, optimizer = nnx.merge(graphdef, state)
  tps = measured_steps * tokens_per_step / (time.time() - t_measure) if measured_steps else None
  model_dir = None
  if cfg.ckpt.export:
    model_dir = export_model(model, os.path.join(workdir, "model"),
                             tokenizer if is_main else None)
  summary = {
      "workdir": workdir, "steps": steps, "start_step": start, "resumed_from": resumed_from,
      "final_loss": last_loss, "eval_loss": None if last_eval is None else last_eval["loss"],
      "eval_ppl": None if last_eval is None else last_eval["ppl"],
      "eval_tokens": None if last_eval is None else last_eval["tokens"],
      "tokens_per_s": tps, "tokens_per_step": tokens_per_step,
      "train_rows": len(train_data), "trainable": cfg.trainable,
      "trainable_params": n_trainable, "total_params": n_total,
      "devices": jax.device_count(), "mesh": dict(mesh.shape),
      "loop_s": wall, "wall_s": time.time() - t_start, "model_dir": model_dir,
      "checkpoint_dir": ck.directory, "config": cfg.to_dict(),
  }
  writer.plot()
  writer.summary(summary)
  summary["model"] = model
  return summary
