"""Perplexity (sliding windows) and top-1 agreement, for any linjax model.

A "model" here is anything called as `model(tokens, positions=..., segment_ids=...)` that
returns logits `[B, T, vocab]`: a `linjax.Llama` (softmax teacher or linearized student)
or a plain function (the tests use lookup tables). Batches have a fixed shape
`[batch_size, seq_len]` so one compilation serves a whole evaluation; padding slots carry
segment id 0 (real tokens 1), so they are never seen by real tokens and never scored.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- inputs

def as_token_docs(tokens_or_dataset) -> list[np.ndarray]:
  """Normalise the accepted inputs to a list of 1-D int32 numpy arrays (one per document).

  Accepts: a `datasets.Dataset` (or anything indexable by the column name) with an
  `input_ids` column; a list / tuple of 1-D token sequences; a 1-D array (one document);
  a 2-D array `[N, T]` (N documents of length T).
  Raises ValueError on empty input or a dataset without `input_ids`.
  """
  x = tokens_or_dataset
  if hasattr(x, "column_names"):
    if "input_ids" not in x.column_names:
      raise ValueError(f"dataset has no 'input_ids' column (columns: {x.column_names}); "
                       "tokenize it first")
    docs = [np.asarray(r, np.int32) for r in x["input_ids"]]
  elif isinstance(x, (list, tuple)):
    docs = [np.asarray(r, np.int32).reshape(-1) for r in x]
  else:
    a = np.asarray(x)
    if a.ndim == 1:
      docs = [a.astype(np.int32)]
    elif a.ndim == 2:
      docs = [r.astype(np.int32) for r in a]
    else:
      raise ValueError(f"token array must be 1-D or 2-D, got shape {a.shape}")
  docs = [d for d in docs if d.size > 0]
  if not docs:
    raise ValueError("no tokens to evaluate")
  return docs


class Window(NamedTuple):
  doc: int        # document index
  begin: int      # first token of the window in document coordinates
  tokens: np.ndarray  # [L] the window's tokens, L <= seq_len
  first_target: int   # targets tokens[first_target:] (window coordinates) are scored


def sliding_windows(docs: Sequence[np.ndarray], seq_len: int, stride: int | None = None):
  """HF-style strided windows (the `transformers` perplexity guide).

  Window k covers tokens [k*stride, k*stride + seq_len); it scores the tokens no earlier
  window scored, each from the logits of the token before it inside the window. So every
  token is scored at most once, with at least `seq_len - stride` tokens of context; a
  window's first token has no context in it and is only scored by an earlier window (with
  disjoint windows, `stride == seq_len`, it is not scored at all, as in the guide)."""
  stride = seq_len if stride is None else int(stride)
  if not 0 < stride <= seq_len:
    raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}")
  out = []
  for d, doc in enumerate(docs):
    L = len(doc)
    prev_end = 1  # token 0 has no context: never a target
    begin = 0
    while True:
      end = min(begin + seq_len, L)
      if end > prev_end:
        out.append(Window(d, begin, doc[begin:end], max(prev_end - begin, 1)))
        prev_end = end
      if end >= L:
        break
      begin += stride
  return out


def _batches(windows, batch_size, seq_len):
  """Yields (tokens, positions, segment_ids, target_mask, windows) with fixed shapes.

  target_mask[b, i] is True when the logits at position i are scored against token i+1."""
  for s in range(0, len(windows), batch_size):
    chunk = windows[s:s + batch_size]
    tok = np.zeros((batch_size, seq_len), np.int32)
    seg = np.zeros((batch_size, seq_len), np.int32)
    mask = np.zeros((batch_size, seq_len), bool)
    for b, w in enumerate(chunk):
      n = len(w.tokens)
      tok[b, :n] = w.tokens
      seg[b, :n] = 1
      mask[b, w.first_target - 1:n - 1] = True
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len))
    yield tok, np.ascontiguousarray(pos), seg, mask, chunk


# ----------------------------------------------------------------------------- jit
# Compiled once per (model structure, batch shape): the model enters as (static graphdef,
# state), so a model trained in place is always evaluated with its current weights, and a
# teacher and a student of the same structure share compilations.

def split_model(model):
  """(static part, weights): (nnx graphdef, nnx state) for a Flax NNX module, else
  (the callable, None)."""
  try:
    from flax import nnx
    if isinstance(model, nnx.Module):
      return nnx.split(model)
  except ImportError:  # pragma: no cover
    pass
  return model, None


def _logits(out):
  """`linjax.Llama` returns (logits, cache); plain functions may return logits."""
  if isinstance(out, (tuple, list)):
    out = out[0]
  return jnp.asarray(out, jnp.float32)


def _forward(static, state, tokens, positions, segment_ids):
  if state is None:
    fn = static
  else:
    from flax import nnx
    fn = nnx.merge(static, state)
  return _logits(fn(tokens, positions=positions, segment_ids=segment_ids))


@functools.partial(jax.jit, static_argnums=0)
def _logits_jit(static, state, tokens, positions, segment_ids):
  return _forward(static, state, tokens, positions, segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def _nll_argmax_jit(static, state, tokens, positions, segment_ids):
  return _nll_and_argmax(_forward(static, state, tokens, positions, segment_ids), tokens)


@functools.partial(jax.jit, static_argnums=0)
def _argmax_jit(static, state, tokens, positions, segment_ids):
  logits = _forward(static, state, tokens, positions, segment_ids)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _target_logprobs_jit(static, state, tokens, positions, segment_ids, targets):
  """Per position: log p(targets) and whether targets is the argmax."""
  logits = _forward(static, state, tokens, positions, segment_ids)
  logp = jax.nn.log_softmax(logits, axis=-1)
  lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return lp, jnp.argmax(logits, axis=-1) == targets


def logits_fn(model):
  """`(tokens, positions, segment_ids) -> logits float32 [B, T, V]`, jitted, for an nnx
  module or a plain function. Models returning `(logits, cache)` are accepted."""
  static, state = split_model(model)
  return lambda t, p, s: _logits_jit(static, state, t, p, s)


def argmax_fn(model):
  """Like `logits_fn` but returns the argmax token ids [B, T] int32 (no logits copied)."""
  static, state = split_model(model)
  return lambda t, p, s: _argmax_jit(static, state, t, p, s)


def target_logprobs_fn(model):
  """`(tokens, positions, segment_ids, targets) -> (log p(targets) [B,T], is_argmax [B,T])`."""
  static, state = split_model(model)
  return lambda t, p, s, y: _target_logprobs_jit(static, state, t, p, s, y)


def _nll_and_argmax(logits, tokens):
  """Per position: -log p(tokens[i+1] | <= i) (0 at the last position) and argmax."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  nll = -jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
  return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _scorer(model):
  static, state = split_model(model)
  return lambda t, p, s: _nll_argmax_jit(static, state, t, p, s)


# ----------------------------------------------------------------------------- public

class PerplexityResult(NamedTuple):
  """perplexity = exp(nll); nll = mean negative log-likelihood (nats) over num_tokens."""
  perplexity: float
  nll: float
  num_tokens: int

  def __float__(self):
    return self.perplexity


def perplexity(model, tokens_or_dataset, *, seq_len: int, batch_size: int = 4,
               stride: int | None = None, max_tokens: int | None = None,
               progress: bool = False) -> PerplexityResult:
  """Perplexity of `model` on documents, with sliding windows for long ones.

  Args:
    model: a linjax model (or any `model(tokens, positions=, segment_ids=) -> [B,T,V]`).
    tokens_or_dataset: a `datasets` split with an `input_ids` column, a list of 1-D token
      arrays (one per document), or a 1-D / 2-D int array.
    seq_len: window length (the model sees at most this many tokens at once).
    batch_size: windows per forward pass; every batch has shape [batch_size, seq_len].
    stride: window step (default `seq_len`: disjoint windows). With `stride < seq_len`
      every scored token has at least `seq_len - stride` tokens of context, as in the HF
      perplexity guide; see `sliding_windows` for which tokens are scored.
    max_tokens: stop after windows covering about this many scored tokens (None: all).
  Returns:
    PerplexityResult(perplexity, nll, num_tokens); `float(result)` is the perplexity.
  Raises:
    ValueError: empty input, a dataset without `input_ids`, a bad stride, or documents
      of a single token only (nothing to predict).
  """
  docs = as_token_docs(tokens_or_dataset)
  windows = sliding_windows(docs, seq_len, stride)
  if max_tokens is not None:
    kept, n = [], 0
    for w in windows:
      if n >= max_tokens:
        break
      kept.append(w)
      n += len(w.tokens) - w.first_target
    windows = kept
  if not windows:
    raise ValueError("no token has a preceding token to predict it from")
  score = _scorer(model)
  total, count = 0.0, 0
  it = _batches(windows, batch_size, seq_len)
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, total=math.ceil(len(windows) / batch_size), desc="perplexity")
  for tok, pos, seg, mask, _ in it:
    nll, _ = score(tok, pos, seg)
    nll = np.asarray(nll, np.float64)
    total += float(nll[mask].sum())
    count += int(mask.sum())
  mean = total / count
  return PerplexityResult(float(math.exp(mean)), float(mean), count)


def top1_agreement(student, teacher, tokens, *, seq_len: int | None = None,
                   batch_size: int = 4) -> float:
  """Fraction of positions where the argmax next-token logits of two models agree.

  tokens: as for `perplexity` (documents or a dataset split). Documents longer than
  `seq_len` (default: the longest document) are cut into disjoint windows; every real
  token position (including each window's last) is compared once.
  Returns a float in [0, 1]. Raises ValueError on empty input.
  """
  docs = as_token_docs(tokens)
  if seq_len is None:
    seq_len = max(len(d) for d in docs)
  windows = [Window(d, b, doc[b:b + seq_len], 0)
             for d, doc in enumerate(docs) for b in range(0, len(doc), seq_len)]
  fs, ft = _scorer(student), _scorer(teacher)
  agree, count = 0, 0
  for tok, pos, seg, _, _ in _batches(windows, batch_size, seq_len):
    _, a = fs(tok, pos, seg)
    _, b = ft(tok, pos, seg)
    real = seg > 0
    agree += int((np.asarray(a) == np.asarray(b))[real].sum())
    count += int(real.sum())
  return agree / count
