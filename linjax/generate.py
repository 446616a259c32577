"""Batched sampling with the model's decode cache (KV cache for softmax layers, recurrent
state for linear ones: whatever each mixer's `init_cache` holds).

    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)            # greedy
    out = generate(model, prompts, temperature=0.8, top_p=0.9, seed=0, eos_token_id=2,
                   callback=lambda toks, active: ...)                           # streaming

Prompts of different lengths are left-padded: padding gets segment id 0 (nobody attends to
it) and each row's positions start at 0 on its first real token, so a batched run equals
running each prompt alone. Prefill is one jitted call; decoding is a Python loop over one
jitted step (so tokens can be streamed), compiled once per (model structure, batch, cache
length).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits, key, *, temperature=0.0, top_p=1.0, greedy=None):
  """Next tokens [B] from logits [B, V]: argmax when temperature == 0, else softmax at
  `temperature` restricted to the smallest set of tokens with mass >= top_p."""
  if greedy is None:
    greedy = temperature == 0
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
  choice = jax.random.categorical(key, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _prefill(graphdef, state, cache, tokens, positions, segment_ids, key, temperature, top_p,
             greedy):
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                        last_only=True)
  tok = sample_logits(logits[:, -1], key, temperature=temperature, top_p=top_p, greedy=greedy)
  return tok, cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _extend(graphdef, state, cache, tokens, positions, segment_ids):
  """Feed a chunk of prompt into the cache (chunked prefill), no sampling."""
  model = nnx.merge(graphdef, state)
  return model(tokens, positions=positions, segment_ids=segment_ids, cache=cache)[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _step(graphdef, state, cache, tok, key, temperature, top_p, greedy):
  model = nnx.merge(graphdef, state)
  logits, cache = model(tok[:, None], cache=cache)
  nxt = sample_logits(logits[:, -1], key, temperature=temperature, top_p=top_p, greedy=greedy)
  return nxt, cache


def decode_state_mib(model, context: int, batch: int = 1) -> float:
  """MiB of `model`'s decode state (`model.init_cache`) for `batch` rows at `context` tokens,
  from shapes only (nothing is allocated): the recurrent states and window rings of linear /
  hybrid layers are the same at every context; a softmax layer's KV cache grows with it."""
  tree = jax.eval_shape(lambda: model.init_cache(batch, context))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2 ** 20


def left_pad(prompts, pad_token_id=0):
  """(tokens, positions, segment_ids) [B, L] for left-padded prompts."""
  lens = [len(p) for p in prompts]
  if min(lens) == 0:
    raise ValueError("every prompt needs at least one token")
  L = max(lens)
  tokens = np.full((len(prompts), L), pad_token_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, L - len(p):] = p
  pad = np.array([L - n for n in lens])[:, None]
  ar = np.arange(L)[None, :]
  positions = np.maximum(ar - pad, 0).astype(np.int32)
  segment_ids = (ar >= pad).astype(np.int32)
  return tokens, positions, segment_ids


def generate(model, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_token_id=None, pad_token_id: int = 0,
             callback=None, cache_len: int | None = None,
             prefill_chunk: int | None = None) -> list[list[int]]:
  """Generate up to `max_new_tokens` per prompt; returns the new token ids of each row
  (EOS included when produced; nothing after it).

  prompts: a list of token-id lists (or one list). eos_token_id: an int or a list of ints.
  callback(tokens: np.ndarray[B], active: np.ndarray[B] bool) is called after each step
  with the token each row just produced (ignore rows where active is False).
  prefill_chunk: feed long prompts in chunks of this many tokens (bounds the attention
  memory of the prefill to chunk x cache_len instead of prompt_len x cache_len).
  """
  single = len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))
  if single:
    prompts = [prompts]
  prompts = [list(map(int, p)) for p in prompts]
  tokens, positions, segment_ids = left_pad(prompts, pad_token_id)
  B, L = tokens.shape
  eos = set() if eos_token_id is None else (
      {int(eos_token_id)} if np.isscalar(eos_token_id) else set(map(int, eos_token_id)))
  eos_arr = np.array(sorted(eos) or [-1])
  greedy = temperature == 0
  temperature = jnp.float32(temperature if not greedy else 1.0)
  top_p = jnp.float32(top_p)
  graphdef, state = nnx.split(model)
  cache = model.init_cache(B, cache_len or (L + max_new_tokens))
  key = jax.random.PRNGKey(seed)
  out = [[] for _ in range(B)]
  active = np.ones(B, bool)
  if max_new_tokens <= 0:
    return out[0] if single else out
  start = 0
  if prefill_chunk:
    while L - start > prefill_chunk:
      sl = slice(start, start + prefill_chunk)
      cache = _extend(graphdef, state, cache, jnp.asarray(tokens[:, sl]),
                      jnp.asarray(positions[:, sl]), jnp.asarray(segment_ids[:, sl]))
      start += prefill_chunk
  tok, cache = _prefill(graphdef, state, cache, jnp.asarray(tokens[:, start:]),
                        jnp.asarray(positions[:, start:]), jnp.asarray(segment_ids[:, start:]),
                        jax.random.fold_in(key, 0), temperature, top_p, greedy=greedy)
  for step in range(max_new_tokens):
    t = np.asarray(tok)
    for b in np.nonzero(active)[0]:
      out[b].append(int(t[b]))
    if callback is not None:
      callback(t, active.copy())
    active &= ~np.isin(t, eos_arr)
    if not active.any() or step == max_new_tokens - 1:
      break
    tok, cache = _step(graphdef, state, cache, tok, jax.random.fold_in(key, step + 1),
                       temperature, top_p, greedy=greedy)
  return out[0] if single else out


def generate_text(model, tokenizer, prompts, *, stream=None, **kw) -> list[str]:
  """Text in, text out. `stream(i, text_piece)` receives each row's new text as it comes."""
  single = isinstance(prompts, str)
  if single:
    prompts = [prompts]
  ids = [tokenizer(p)["input_ids"] for p in prompts]
  kw.setdefault("eos_token_id", tokenizer.eos_token_id)
  if kw.get("pad_token_id") is None:
    kw["pad_token_id"] = tokenizer.pad_token_id or 0
  done = [[] for _ in prompts]
  shown = ["" for _ in prompts]
  eos = kw["eos_token_id"]

  def cb(toks, active):
    for i in np.nonzero(active)[0]:
      if eos is not None and int(toks[i]) == eos:
        continue
      done[i].append(int(toks[i]))
      text = tokenizer.decode(done[i], skip_special_tokens=True)
      if stream is not None and len(text) > len(shown[i]) and not text.endswith("\ufffd"):
        stream(i, text[len(shown[i]):])
        shown[i] = text

  generate(model, ids, callback=cb, **kw)
  texts = [tokenizer.decode(d, skip_special_tokens=True) for d in done]
  if stream is not None:
    for i, t in enumerate(texts):
      if len(t) > len(shown[i]):
        stream(i, t[len(shown[i]):])
  return texts[0] if single else texts
