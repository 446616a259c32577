"""Training checkpoints: orbax `CheckpointManager` over model + optimizer + metadata, with
per-array checksums, fall-back past damaged steps, and the resume-config check.

One checkpoint per saved step under `workdir/checkpoints/<step>/`, with four items:
  model      `nnx.state(model)` as a pure dict (or, with `trainable_only`, the trainable
             params plus non-parameter state such as dropout RNG counters)
  optimizer  `nnx.state(optimizer)` (step count and optax state of the trainable params)
  meta       JSON: step, data position, the run's base RNG key, loss, config
  checksums  JSON: shape, dtype and a 64-bit checksum of every array of model / optimizer
Saves are asynchronous (`async_save`): the arrays are copied to host before `save` returns,
the files are written in the background, and orbax writes to a temporary directory that is
renamed when complete, so a process killed mid-save leaves no checkpoint that
`latest_step()` would return. `keep` bounds how many are kept. PRNG key arrays are stored as
their raw key data and re-wrapped on restore.

Damage after the write (a truncated or missing file, flipped bytes, a half-copied folder)
is what orbax cannot see: tensorstore either fails with a long traceback or, for bytes
flipped inside a compressed chunk, returns other numbers without a word. So every restore
recomputes the checksums of what it read and compares them with the saved ones; any
failure becomes one `CheckpointCorruptError` line naming the step, the item, the array and
the cause. `restore_latest_intact` walks back from the newest step to the newest one that
restores and verifies, and records the ones it skipped (`skipped`: [(step, reason)]).

The checksum (`array_checksum`) is a sum over elements, mod 2^32 twice, of the element's
bits times / mixed with a hash of its flat index: it is computed on device under jit on the
(sharded, possibly multi-host) arrays, gives the same value for any sharding or process
count, and changes with certainty when any single element changes.

Resuming with another config: `check_resume_config(saved, current, allow=...)` names the
fields whose change alters the computation (everything except `RESUME_IGNORED`), and raises
`ResumeConfigError` unless `allow=True`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

CHECKSUM_ALGORITHM = "linjax-sum2x32-v1"
ITEMS = ("model", "optimizer")


class CheckpointCorruptError(RuntimeError):
  """A saved step cannot be restored as written: `step`, `reason` (one line)."""

  def __init__(self, step, reason, directory=""):
    self.step, self.reason, self.directory = step, reason, directory
    where = f" in {directory}" if directory else ""
    super().__init__(f"checkpoint step {step}{where} is damaged: {reason}")


class ResumeConfigError(ValueError):
  """The config of a resumed run differs from the saved one in fields that change the
  computation: `fields` lists them as 'name: saved -> current'."""

  def __init__(self, fields):
    self.fields = list(fields)
    super().__init__(
        f"the config differs from the one saved with the checkpoint in "
        f"{len(self.fields)} field(s) that change the computation: " + "; ".join(self.fields)
        + ". Resume with the saved values, start a new workdir, or allow the change "
        "explicitly (check_resume_config(..., allow=True))")


# ----------------------------------------------------------------------------- checksums

def _fmix32(x, xp):
  """murmur3's 32-bit finaliser (uint32 in, uint32 out) for numpy or jax.numpy."""
  x = x ^ (x >> xp.uint32(16))
  x = x * xp.uint32(0x85EBCA6B)
  x = x ^ (x >> xp.uint32(13))
  x = x * xp.uint32(0xC2B2AE35)
  return x ^ (x >> xp.uint32(16))


def _words_np(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x)
  if x.dtype == bool:
    x = x.astype(np.uint8)
  size = x.dtype.itemsize
  if size == 8:
    return x.reshape(-1).view(np.uint32)
  u = {1: np.uint8, 2: np.uint16, 4: np.uint32}[size]
  return x.reshape(-1).view(u).astype(np.uint32)


def _words_jnp(x):
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size == 8:   # only with jax_enable_x64: two 32-bit words per element
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  u = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, u).astype(jnp.uint32).reshape(-1)


def _sums(w, idx, xp):
  h1 = _fmix32(idx ^ xp.uint32(0x9E3779B9), xp) | xp.uint32(1)    # odd: a changed word
  h2 = _fmix32(idx ^ xp.uint32(0x7F4A7C15), xp)                   # always changes s1
  s1 = (w * h1).sum(dtype=xp.uint32)
  s2 = _fmix32(w + h2, xp).sum(dtype=xp.uint32)
  return s1, s2


def array_checksum_np(x) -> str:
  """The checksum of one array (numpy, on host): 16 hex digits."""
  w = _words_np(np.asarray(x))
  with np.errstate(over="ignore"):
    s1, s2 = _sums(w, np.arange(w.size, dtype=np.uint32), np)
  return f"{int(s1):08x}{int(s2):08x}"


@jax.jit
def _checksums_jit(leaves):
  out = []
  for x in leaves:
    w = _words_jnp(x)
    out.append(jnp.stack(_sums(w, jax.lax.iota(jnp.uint32, w.shape[0]), jnp)))
  return out


def _flatten(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): x for p, x in flat}


def checksums(tree) -> dict:
  """{dotted path: {"shape", "dtype", "sum"}} for every array leaf of a pure pytree (jax
  arrays on device under one jit, whatever their sharding; numpy leaves on host)."""
  flat = _flatten(tree)
  dev = {k: x for k, x in flat.items() if isinstance(x, jax.Array) and x.size}
  res = dict(zip(dev, _checksums_jit(list(dev.values())))) if dev else {}
  out = {}
  for k, x in flat.items():
    if k in res:
      s = np.asarray(res[k].addressable_data(0))
      digest = f"{int(s[0]):08x}{int(s[1]):08x}"
    else:
      digest = array_checksum_np(x)
    dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    out[k] = {"shape": list(np.shape(x)), "dtype": str(dtype), "sum": digest}
  return out


def compare_checksums(saved: dict, got: dict) -> list[str]:
  """Names (with what differs) of the arrays whose restored checksum, shape or dtype is not
  the saved one, and of saved arrays that were not restored."""
  bad = []
  for k, s in saved.items():
    g = got.get(k)
    if g is None:
      bad.append(f"{k} (missing)")
    elif list(g["shape"]) != list(s["shape"]) or g["dtype"] != s["dtype"]:
      bad.append(f"{k} (saved {s['dtype']}{s['shape']}, read {g['dtype']}{g['shape']})")
    elif g["sum"] != s["sum"]:
      bad.append(f"{k} (checksum {g['sum']} != saved {s['sum']})")
  return bad


# ----------------------------------------------------------------------------- helpers

def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_saved(tree, like):
  return jax.tree.map(
      lambda x, l: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l)) if _is_key(l) else x,
      tree, like)


def _abstract(tree):
  def f(x):
    if _is_key(x):
      x = jax.random.key_data(x)
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  return jax.tree.map(f, tree)


def pure(state) -> dict:
  return nnx.to_pure_dict(state)


def _one_line(e: BaseException, limit: int = 400) -> str:
  """The most specific line of an exception chain (tensorstore wraps the real cause, e.g.
  'OUT_OF_RANGE: Error reading "a/0.0" ...', under a page-long spec dump)."""
  chain, c = [], e
  while c is not None and len(chain) < 10:
    chain.append(c)
    c = c.__cause__ or c.__context__
  lines = [(type(x).__name__, (str(x).strip().splitlines() or [""])[0]) for x in chain]
  name, msg = lines[-1]
  if "See full TensorStore details" in msg or not msg:
    name, msg = next(((n, m) for n, m in reversed(lines) if m and "TensorStore details"
                      not in m), lines[-1])
  array = re.findall(r"'path': '([^'/][^']*)'", str(e))   # the array key inside the item
  where = f"array {array[-1].rstrip('/')!r}: " if array else ""
  msg = msg.split(" See full TensorStore details")[0]
  out = f"{where}{name}: {msg}"
  return out if len(out) <= limit else out[:limit - 3] + "..."


# ----------------------------------------------------------------------------- Checkpointer

class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for (model state, optimizer state, meta)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "model": ocp.StandardCheckpointHandler(),
        "optimizer": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "checksums": ocp.JsonCheckpointHandler()})
    self.skipped: list[tuple[int, str]] = []

  def latest_step(self) -> int | None:
    """The newest complete (finalised) step; it may still be damaged on disk, see
    `restore_latest_intact` / `verify`."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, model_state, opt_state, meta: dict) -> bool:
    """Saves the step with the checksums of every array (computed now, on device)."""
    m, o = to_saveable(pure(model_state)), to_saveable(pure(opt_state))
    sums = {"algorithm": CHECKSUM_ALGORITHM, "model": checksums(m), "optimizer": checksums(o)}
    return self.manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(m), optimizer=ocp.args.StandardSave(o),
        meta=ocp.args.JsonSave(meta), checksums=ocp.args.JsonSave(sums)))

  # --- reading --------------------------------------------------------------------------
  def _saved_checksums(self, step):
    if not os.path.isdir(os.path.join(self.directory, str(step), "checksums")):
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))
    return dict(out["checksums"])

  def _restore_items(self, step: int, targets: dict, meta: bool, verify: bool):
    """Restore the items in `targets` ({item: pure target}) (+ meta); raise
    CheckpointCorruptError (one line) on any read failure or checksum mismatch."""
    if step not in self.all_steps():
      raise CheckpointCorruptError(step, f"no such step (saved: {self.all_steps()})",
                                   self.directory)
    sums = None
    if verify:
      try:
        sums = self._saved_checksums(step)
      except Exception as e:  # noqa: BLE001 - anything orbax / json raises: name it
        raise CheckpointCorruptError(step, "checksums: " + _one_line(e),
                                     self.directory) from None
      if sums is None:
        warnings.warn(f"checkpoint step {step} in {self.directory} has no checksums (written "
                      "before linjax saved them): restored unverified", stacklevel=3)
    out = {}
    names = list(targets) + (["meta"] if meta else [])
    for item in names:   # one item at a time, so the error names it
      arg = (ocp.args.JsonRestore() if item == "meta"
             else ocp.args.StandardRestore(_abstract(targets[item])))
      try:
        out[item] = self.manager.restore(step, args=ocp.args.Composite(**{item: arg}))[item]
      except Exception as e:  # noqa: BLE001
        raise CheckpointCorruptError(step, f"{item}: " + _one_line(e),
                                     self.directory) from None
    if sums is not None:
      for item in targets:
        bad = compare_checksums(sums.get(item, {}), checksums(out[item]))
        if bad:
          more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
          raise CheckpointCorruptError(
              step, f"{item}: {len(bad)} array(s) read back differ from what was saved: "
              + ", ".join(bad[:3]) + more, self.directory)
    return out

  def restore(self, step: int, model_state, opt_state, *, verify: bool = True):
    """Restores into (copies of) the given states, keeping their shardings, after checking
    every array against its saved checksum (`verify`).

    Returns (model_state, opt_state, meta) as nnx States of the same structure. Raises
    `CheckpointCorruptError` (one line: step, item, array, cause) when the step cannot be
    read or reads back other numbers; the given states are then left untouched."""
    mp, op = pure(model_state), pure(opt_state)
    out = self._restore_items(step, {"model": mp, "optimizer": op}, True, verify)
    nnx.replace_by_pure_dict(model_state, from_saved(out["model"], mp))
    nnx.replace_by_pure_dict(opt_state, from_saved(out["optimizer"], op))
    return model_state, opt_state, dict(out["meta"])

  def restore_latest_intact(self, model_state, opt_state, *, verify: bool = True):
    """Restores the newest step that reads back intact, walking back past damaged ones.

    Returns (step, model_state, opt_state, meta), or None when no step is saved. Damaged
    steps are recorded in `self.skipped` as (step, reason), newest first, and warned about
    by name; raises `CheckpointCorruptError` (of the newest) when every saved step is
    damaged. The damaged steps are not deleted (look at them, or remove them by hand)."""
    self.skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        ms, os_, meta = self.restore(step, model_state, opt_state, verify=verify)
      except CheckpointCorruptError as e:
        self.skipped.append((step, e.reason))
        warnings.warn(f"{e}; trying an older step", stacklevel=2)
        continue
      return step, ms, os_, meta
    if self.skipped:
      step, reason = self.skipped[0]
      raise CheckpointCorruptError(
          step, f"{reason} (and every older step is damaged too: "
          f"{[s for s, _ in self.skipped[1:]]})", self.directory)
    return None

  def restore_model(self, step: int, model_state, *, verify: bool = True):
    """Restores only the model item into (a copy of) `model_state` (checksums verified)."""
    mp = pure(model_state)
    out = self._restore_items(step, {"model": mp}, False, verify)
    nnx.replace_by_pure_dict(model_state, from_saved(out["model"], mp))
    return model_state

  def verify(self, step: int) -> str | None:
    """None when step `step` reads back exactly as saved, else the reason (one line). Reads
    every array to host (single-process use: a check of a run's folder, not a resume)."""
    try:
      sums = self._saved_checksums(step)
      targets = {}
      for item in ITEMS:
        md = self.manager.item_metadata(step)[item]
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        targets[item] = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
            dict(getattr(md, "tree", md)),
            is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    except Exception as e:  # noqa: BLE001
      return _one_line(e)
    if sums is None:
      return "no checksums saved with this step"
    try:
      self._restore_items(step, targets, True, True)
    except CheckpointCorruptError as e:
      return e.reason
    return None

  def saved_keys(self, step: int, item: str = "model") -> list[str]:
    """Dotted paths of the arrays saved in `item` of checkpoint `step` (from its metadata)."""
    tree = self.manager.item_metadata(step)[item]
    flat = jax.tree_util.tree_flatten_with_path(
        dict(tree), is_leaf=lambda x: not isinstance(x, dict))[0]
    return [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in flat]

  def read_meta(self, step: int) -> dict:
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise CheckpointCorruptError(step, "meta: " + _one_line(e), self.directory) from None
    return dict(out["meta"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------- resume config

# Fields whose change does not alter what is computed: logging, checkpoint cadence and
# export, the device layout (the same math on another mesh), the method picking how a mixer
# computes the same function, evaluation-only settings, test hooks. Each entry is an
# `fnmatch` pattern over dotted names that also covers everything below it ("mesh" covers
# "mesh.fsdp"); "stages.*." forms cover per-stage fields of a multi-stage config.
RESUME_IGNORED = (
    "log_every", "eval_every", "progress", "ckpt.every", "ckpt.keep", "ckpt.async_save",
    "ckpt.export", "mesh", "model.method", "model.attention_method", "data.eval_rows",
    "data.eval_path", "data.num_proc", "eval", "debug_*", "allow_config_change", "teacher_cache",
    "stages.*.log_every", "stages.*.eval_every", "stages.*.ckpt_every", "stages.*.ckpt.every")


def _as_plain(cfg) -> dict:
  if cfg is None:
    return {}
  if isinstance(cfg, (str, bytes)):
    cfg = json.loads(cfg)
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  return json.loads(json.dumps(cfg, default=str))   # tuples -> lists, leaves comparable


def _flat_config(d, prefix="") -> dict:
  out = {}
  for k, v in d.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flat_config(v, name + "."))
    else:
      out[name] = v
  return out


def _ignored(name, ignore) -> bool:
  return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*")
             for p in ignore)


def config_differences(saved, current, *, ignore=RESUME_IGNORED) -> list[str]:
  """'field: saved -> current' for every field (dotted) that differs and is not ignored
  (a field on one side only counts: '(absent)'). A `steps` field (`steps`, or
  `stages.NAME.steps`) counts only when the `optim.schedule` beside it is "cosine" on either
  side, the one schedule that depends on the total step count."""
  a, b = _flat_config(_as_plain(saved)), _flat_config(_as_plain(current))
  absent = "(absent)"
  out = []
  for name in sorted(set(a) | set(b)):
    x, y = a.get(name, absent), b.get(name, absent)
    if x == y or _ignored(name, ignore):
      continue
    if name == "steps" or name.endswith(".steps"):
      sched = name[:-len("steps")] + "optim.schedule"
      if "cosine" not in (a.get(sched), b.get(sched)):
        continue
    out.append(f"{name}: {json.dumps(x) if x is not absent else x} -> "
               f"{json.dumps(y) if y is not absent else y}")
  return out


def check_resume_config(saved, current, *, allow: bool = False,
                        ignore=RESUME_IGNORED) -> list[str]:
  """Compare the config saved with a checkpoint (`meta["config"]`: a JSON string, dict or
  ConfigDict) with the current one before resuming.

  Returns the differing fields that change the computation, as 'name: saved -> current'
  (empty: resume as usual). Raises `ResumeConfigError` naming them unless `allow=True`
  (then the caller should log them). `ignore`: dotted names or prefixes that may change
  freely (default `RESUME_IGNORED`; pass `RESUME_IGNORED + ("steps",)` to extend a run)."""
  diffs = config_differences(saved, current, ignore=ignore)
  if diffs and not allow:
    raise ResumeConfigError(diffs)
  return diffs
