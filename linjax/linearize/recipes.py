"""Linearization recipes as plain functions (the demo, `linjax.linearize.run` and tests call
them; the trainer reaches the same losses through `linjax.linearize.losses`).

  attention_transfer(model, batches, ...)   LoLCATs stage 1 / Hedgehog: only FeatureMapParams
      train; every linearized layer sees the teacher's hidden states (its mixer returns the
      softmax output in distill mode) and contributes one loss: "mse" between the softmax and
      linear head outputs before o_proj (LoLCATs), or "xent" between attention weights
      (Hedgehog). Each layer's loss is checkpointed, so no T x T tensor is kept across layers.
  finetune(model, batches, trainable=...)   next-token cross-entropy on a parameter subset
      (LoRAParam for LoLCATs stage 2 / Liger, nnx.Param for SUPRA's full uptraining).
  token_batches(tokenizer, ...)             [B, T] rows from the embedded corpus' train split.
  quick_eval(student, teacher, tokens)      held-out perplexity and top-1 agreement.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from linjax.layers.params import FeatureMapParam, LoRAParam
from linjax.linearize import set_distill


def _progress(it, total, desc, enabled):
  if not enabled:
    return it
  from tqdm.auto import tqdm
  return tqdm(it, total=total, desc=desc, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------

def token_stream(tokenizer, n_tokens: int, *, split: str = "train", seed: int = 0,
                 skip_tokens: int = 0) -> np.ndarray:
  """At least `n_tokens` tokens of shuffled embedded-corpus documents joined by EOS."""
  from linjax.train.corpus import embedded_corpus
  docs = embedded_corpus(split)
  order = np.random.default_rng(seed).permutation(len(docs))
  eos = getattr(tokenizer, "eos_token_id", None)
  out, need = [], n_tokens + skip_tokens
  for i in order:
    ids = tokenizer(docs[i]["text"], add_special_tokens=False)["input_ids"]
    out.extend(ids)
    if eos is not None:
      out.append(int(eos))
    if len(out) >= need:
      break
  arr = np.asarray(out, np.int32)[skip_tokens:need]
  if len(arr) < n_tokens:
    raise ValueError(f"corpus split {split!r} has only {len(arr)} tokens, need {n_tokens}")
  return arr


def token_batches(tokenizer, *, steps: int, batch_size: int, seq_len: int, seed: int = 0,
                  skip_tokens: int = 0) -> np.ndarray:
  """[steps, batch_size, seq_len] int32 rows of training text."""
  n = steps * batch_size * seq_len
  return token_stream(tokenizer, n, seed=seed, skip_tokens=skip_tokens).reshape(
      steps, batch_size, seq_len)


# ----------------------------------------------------------------------------------------
# stage 1: attention transfer
# ----------------------------------------------------------------------------------------

def transfer_losses(model, tokens, positions=None, segment_ids=None):
  """Mean of the per-layer attention-transfer losses of a model in distill mode."""
  model(tokens, positions=positions, segment_ids=segment_ids)
  inter = nnx.pop(model, nnx.Intermediate)
  leaves = jax.tree.leaves(inter)
  if not leaves:
    raise ValueError("no layer sowed a transfer loss: call set_distill(model, kind) first "
                     "and linearize some layers with a mixer that supports distillation")
  return jnp.stack([jnp.asarray(l, jnp.float32).reshape(()) for l in leaves])


def _distill_layers(model):
  return [(i, l.self_attn) for i, l in enumerate(model.layers)
          if hasattr(l.self_attn, "student_quadratic")]


def collect_qkv(model, tokens):
  """Teacher-forced (rotary q, k and v per query head) of every distillable layer.

  The model runs in distill mode, so each layer's input is the teacher's hidden state."""
  from linjax.layers.base import repeat_kv
  B, T = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  hs = model.hidden_states(tokens)
  nnx.pop(model, nnx.Intermediate)
  out = []
  for i, m in _distill_layers(model):
    x = hs["mixer_inputs"][i]
    q, k, v = m.project(x)
    rep = m.num_heads // m.num_kv_heads
    out.append((m.rotate(q, pos), repeat_kv(m.rotate(k, pos), rep), repeat_kv(v, rep)))
  return out


def cached_transfer_losses(model, qkvs, kind):
  """Per-layer transfer losses [L] from collected (q, k, v); each layer checkpointed."""
  from linjax.layers.base import segment_masks
  from linjax.layers.distill import softmax_heads, transfer_loss
  losses = []
  for (i, m), (q, k, v) in zip(_distill_layers(model), qkvs):
    B, T = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    vis = segment_masks(pos, None)
    scale = m.head_dim ** -0.5

    @jax.checkpoint
    def one(params, q, k, v, m=m, pos=pos, vis=vis, scale=scale):
      ty, tp = softmax_heads(q, k, v, vis=vis, scale=scale)
      sy, sw = m.student_quadratic(params, q, k, v, pos, vis)
      return transfer_loss(sw, tp, sy, ty, kind)

    losses.append(one(m.student_params(), q, k, v))
  return jnp.stack(losses)


def attention_transfer(model, batches, *, lr: float = 1e-2, kind: str = "mse",
                       loss_scale: float = 1000.0, inner_steps: int = 1,
                       time_budget: float | None = None, progress: bool = True,
                       log_every: int = 10, log=print):
  """Train only the FeatureMapParams with per-layer transfer losses. Returns a history dict.

  Each batch is run once through the (teacher-forced) model to collect every layer's q, k, v;
  then `inner_steps` Adam steps are taken on those (the teacher forward is the expensive
  part on a CPU, the per-layer losses are cheap).
  """
  set_distill(model, kind)
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=FeatureMapParam)

  collect = nnx.jit(collect_qkv)

  @nnx.jit
  def step(model, opt, qkvs):
    def loss_fn(model):
      losses = cached_transfer_losses(model, qkvs, kind)
      return loss_scale * losses.mean(), losses
    (loss, per_layer), grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, FeatureMapParam), has_aux=True)(model)
    opt.update(model, grads)
    return loss, per_layer

  hist = {"loss": [], "tokens": 0, "steps": 0, "seconds": 0.0}
  t0 = time.time()
  it = _progress(range(len(batches)), len(batches), f"attention transfer ({kind})", progress)
  for i in it:
    qkvs = collect(model, jnp.asarray(batches[i]))
    for _ in range(inner_steps):
      loss, _ = step(model, opt, qkvs)
    loss = float(loss)
    _check_finite(loss, "attention transfer", i)
    hist["loss"].append(loss)
    hist["tokens"] += int(np.prod(batches[i].shape))
    hist["steps"] += 1
    if progress and hasattr(it, "set_postfix"):
      it.set_postfix(loss=f"{loss:.4g}")
    elif log and (i % log_every == 0):
      log(f"  step {i}: transfer loss {loss:.4g}")
    if i == 0:
      t_run = time.time()  # the budget counts from the end of the first (compiling) step
    elif time_budget is not None and time.time() - t_run > time_budget:
      break
  hist["seconds"] = time.time() - t0
  set_distill(model, None)
  return hist


# ----------------------------------------------------------------------------------------
# stage 2 / Liger / SUPRA: cross-entropy fine-tuning
# ----------------------------------------------------------------------------------------

def _check_finite(loss: float, stage: str, step: int):
  if not math.isfinite(loss):
    from linjax.train.trainer import NonFiniteLossError
    raise NonFiniteLossError(f"{stage}: non-finite loss ({loss}) at step {step}; stopping "
                             "(lower the learning rate or check the inputs)")


def lm_loss(model, tokens):
  logits, _ = model(tokens)
  logits = logits[:, :-1].astype(jnp.float32)
  tgt = tokens[:, 1:]
  logz = jax.nn.logsumexp(logits, -1)
  ll = jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
  return (logz - ll).mean()


def budget_lr(peak: float, step: int, done: float, warmup: int = 0, final: float = 0.1):
  """Warmup over `warmup` steps, then cosine from `peak` to `final * peak` as the run's
  completed fraction `done` goes 0 -> 1."""
  if step < warmup:
    return peak * (step + 1) / warmup
  return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * done)))


def finetune(model, batches, *, lr: float = 1e-3, trainable=LoRAParam, warmup: int = 0,
             weight_decay: float = 0.0, time_budget: float | None = None,
             progress: bool = True, log_every: int = 10, log=print):
  """Next-token cross-entropy on the `trainable` parameters. Returns a history dict.

  The history holds per-step loss, learning rate and gradient norm (before the clip to 1).
  Learning rate: linear warmup over `warmup` steps, then a cosine from `lr` to `lr / 10`
  over the run. With a `time_budget` the run's end is whichever comes first, the last batch
  or the budget, so a time-limited run still decays fully (a step-count cosine would keep
  the rate near its peak when the budget stops it early).
  """
  set_distill(model, None)
  n = len(batches)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(optax.adamw)(learning_rate=lr,
                                                         weight_decay=weight_decay))
  opt = nnx.Optimizer(model, tx, wrt=trainable)

  @nnx.jit
  def step(model, opt, tokens, rate):
    loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, trainable))(model, tokens)
    opt.opt_state[1].hyperparams["learning_rate"].value = rate
    opt.update(model, grads)
    return loss, optax.global_norm(grads)

  hist = {"loss": [], "tokens": 0, "steps": 0, "seconds": 0.0, "lr": [], "grad_norm": []}
  t0 = time.time()
  t_run = None
  it = _progress(range(n), n, "fine-tune (cross-entropy)", progress)
  for i in it:
    done = i / max(n - 1, 1)
    if time_budget and t_run is not None:
      done = max(done, (time.time() - t_run) / time_budget)
    rate = budget_lr(lr, i, min(done, 1.0), warmup)
    hist["lr"].append(rate)
    loss, gnorm = map(float, step(model, opt, jnp.asarray(batches[i]), jnp.float32(rate)))
    _check_finite(loss, "fine-tune (cross-entropy)", i)
    hist["loss"].append(loss)
    hist["grad_norm"].append(gnorm)  # before clipping to 1.0
    hist["tokens"] += int(np.prod(batches[i].shape))
    hist["steps"] += 1
    if progress and hasattr(it, "set_postfix"):
      it.set_postfix(loss=f"{loss:.3f}", gnorm=f"{gnorm:.2g}")
    elif log and (i % log_every == 0):
      log(f"  step {i}: ce {loss:.4f}  grad norm {gnorm:.3g}  lr {rate:.3g}")
    if i == 0:
      t_run = time.time()  # the budget counts from the end of the first (compiling) step
    elif time_budget is not None and time.time() - t_run > time_budget:
      break
  hist["seconds"] = time.time() - t0
  return hist


# ----------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------

def heldout(tokenizer, windows: int = 6, seq_len: int = 512) -> np.ndarray:
  """The fixed held-out tokens (DESIGN.md: pydoc text, 6 x 512)."""
  from linjax.eval.suite import heldout_tokens
  return heldout_tokens(tokenizer, windows * seq_len)


def quick_eval(model, teacher, tokens, *, seq_len: int = 512, batch_size: int = 2):
  """{"ppl", "top1"} of `model` on held-out `tokens` (top-1 vs `teacher`; None if no teacher)."""
  from linjax.eval.metrics import perplexity, top1_agreement
  ppl = float(perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size))
  top1 = None
  if teacher is not None and teacher is not model:
    top1 = float(top1_agreement(model, teacher, tokens.reshape(-1, seq_len),
                                seq_len=seq_len, batch_size=batch_size))
  return {"ppl": ppl, "top1": top1}
