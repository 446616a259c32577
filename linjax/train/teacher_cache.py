"""The teacher's top-k next-token log-probabilities, cached on disk for KL distillation.

A stage with `kl_top_k = k > 0` does not run the teacher inside its train step: each batch's
rows are looked up in a cache of the teacher's k most likely tokens per position (their
log-probabilities at the stage's `kl_temperature`, their ids, and the log of the probability
left outside them); rows not in the cache yet are computed once by the teacher, written, and
read back by every later step, epoch and run that meets the same rows. The `kl` objective then
distils the (k + 1)-bucket distribution: the top-k tokens and one "everything else" bucket,

    KL_k = sum_{i in top-k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest),

q the student's distribution with q_rest its mass outside the teacher's top-k. KL_k <= KL (the
coarsening only merges outcomes) and KL_k = KL at k = vocab; the teacher's share is
`p_rest`, stored per position so a table can say what k keeps.

Rows are keyed by their content (input ids, positions, segment ids) and the settings (the
teacher's weights by their SHA-256, k, temperature), one `.npz` per row under `directory`
(written to a temporary name, then renamed: a killed run never leaves a half-written entry).
Sharing one directory between runs is what it is for: the recipe matrix, sweeps, reruns.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

KEYS = ("teacher_logp", "teacher_idx", "teacher_rest")
ROW_KEYS = ("input_ids", "positions", "segment_ids")


def topk_logprobs(logits, k: int, temperature: float = 1.0):
  """(logp [..., k] float32, ids [..., k] int32, rest [...] float32) of `logits`: the k
  largest log-probabilities of softmax(logits / temperature), their token ids, and the log of
  the probability outside them (-inf when k equals the vocabulary)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  top, ids = jax.lax.top_k(logp, k)
  if k == logp.shape[-1]:
    rest = jnp.full(logp.shape[:-1], -jnp.inf, jnp.float32)
  else:
    rest = _logsumexp_outside(logp, ids)
  return top, ids.astype(jnp.int32), rest


def _logsumexp_outside(logp, ids):
  """log of the probability mass of `logp` [..., V] outside the token ids [..., k]."""
  return jax.nn.logsumexp(jnp.put_along_axis(logp, ids, -jnp.inf, axis=-1, inplace=False), -1)


def topk_kl(teacher: dict, student_logits, temperature: float = 1.0):
  """KL_k(teacher || student) per position [...] (times temperature^2, as `token_kl`) from a
  teacher's cached top-k (`KEYS`: [..., k], [..., k], [...]) and the student's logits."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t, ids = teacher["teacher_logp"], teacher["teacher_idx"]
  kl = (jnp.exp(t) * (t - jnp.take_along_axis(s, ids, axis=-1))).sum(-1)
  if ids.shape[-1] < s.shape[-1]:   # the "everything else" bucket (empty at k = vocab)
    rest = teacher["teacher_rest"]
    kl = kl + jnp.exp(rest) * (rest - _logsumexp_outside(s, ids))
  return kl * temperature ** 2


def fingerprint(state) -> str:
  """SHA-256 over the teacher's arrays (names, shapes, dtypes, bytes)."""
  h = hashlib.sha256()
  for path, x in sorted(jax.tree_util.tree_leaves_with_path(state),
                        key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(jax.device_get(x))
    h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class TeacherTopK:
  """`attach(batch)` adds the teacher's top-k arrays (`KEYS`) to a numpy batch, from the cache
  or computed (and cached). `hits` / `misses` count rows."""

  def __init__(self, directory: str, teacher, k: int, temperature: float = 1.0,
               loss_chunk: int = 0, mesh=None):
    from flax import nnx
    vocab = int(teacher.config.vocab_size)
    if not 1 <= int(k) <= vocab:
      raise ValueError(f"kl_top_k must be in [1, vocab = {vocab}], got {k}")
    self.directory, self.k, self.temperature = directory, int(k), float(temperature)
    self.hits = self.misses = 0
    gdef, state = nnx.split(teacher)
    self._state = state
    settings = {"teacher": fingerprint(state), "k": self.k, "temperature": self.temperature,
                "vocab": vocab}
    self._salt = json.dumps(settings, sort_keys=True).encode()
    os.makedirs(directory, exist_ok=True)
    chunk = int(loss_chunk)
    out_sh = None
    if mesh is not None:   # every host gets the whole result (each holds the whole batch)
      from jax.sharding import NamedSharding, PartitionSpec
      out_sh = NamedSharding(mesh, PartitionSpec())

    def compute(state, batch):
      t = nnx.merge(gdef, state)
      kw = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
      T = batch["input_ids"].shape[1]
      if 0 < chunk < T:   # the LM head a chunk of positions at a time (no [B, T, vocab])
        from linjax.train.objectives import split_positions
        hs = split_positions(t.final_hidden(batch["input_ids"], **kw), chunk)
        outs = jax.lax.map(lambda x: topk_logprobs(t.head(x), self.k, self.temperature), hs)
        return tuple(jnp.moveaxis(o, 0, 1).reshape(o.shape[1], -1, *o.shape[3:])[:, :T]
                     for o in outs)
      out = t(batch["input_ids"], **kw)
      logits = out[0] if isinstance(out, tuple) else out
      return topk_logprobs(logits, self.k, self.temperature)

    self._compute = jax.jit(compute, out_shardings=out_sh)

  def _path(self, batch, r: int) -> str:
    h = hashlib.sha256(self._salt)
    for key in ROW_KEYS:
      if batch.get(key) is not None:
        a = np.ascontiguousarray(batch[key][r])
        h.update(f"{key}|{a.shape}|{a.dtype}".encode())
        h.update(a.tobytes())
    d = h.hexdigest()
    return os.path.join(self.directory, d[:2], d + ".npz")

  def attach(self, batch: dict) -> dict:
    rows = batch["input_ids"].shape[0]
    paths = [self._path(batch, r) for r in range(rows)]
    found = {}
    for r, p in enumerate(paths):
      if os.path.exists(p):
        with np.load(p) as z:
          found[r] = tuple(z[key] for key in KEYS)
    missing = [r for r in range(rows) if r not in found]
    self.hits += len(found)
    self.misses += len(missing)
    if missing:
      arrays = {k: v for k, v in batch.items() if k in ROW_KEYS and v is not None}
      out = [np.asarray(x) for x in self._compute(self._state, arrays)]
      for r in missing:
        found[r] = tuple(o[r] for o in out)
        os.makedirs(os.path.dirname(paths[r]), exist_ok=True)
        tmp = f"{paths[r]}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
          np.savez(f, **dict(zip(KEYS, found[r])))
        os.replace(tmp, paths[r])
    return dict(batch, **{key: np.stack([found[r][i] for r in range(rows)])
                          for i, key in enumerate(KEYS)})
