"""Training data: load documents, tokenize (cached by `datasets`), pack, iterate resumably.

  docs = load_documents(cfg.data, "train")          # datasets.Dataset with a "text" column
  tok = linjax.data.load_tokenizer("smollm2")        # or "byte", a folder, a .gguf file
  ids = tokenize(docs, tok)                          # .map(batched=True): cached on disk
  packed = pack(ids, seq_len=512)                    # PackedData: [N, T] tokens, segment_ids, positions
  it = DataIterator(packed, global_batch_size=8, seed=0)
  batch = next(it)                                   # dict of numpy arrays, this host's rows
  it.position                                        # batches consumed: saved in checkpoints

Sources (`config.data.path`): None or "embedded" (the embedded corpus of
`linjax.train.corpus`), a `.txt` / `.jsonl` / `.json` / `.parquet` file, a glob or folder of
such files, or a `datasets.save_to_disk` folder. The held-out split is
`config.data.eval_path` when given, the embedded "heldout" split for the embedded corpus, and
otherwise the last `eval_fraction` of the documents (in file order).

Packing concatenates documents, each followed by the tokenizer's EOS, and cuts the stream into
rows of `seq_len` tokens. `segment_ids` number the documents inside a row from 1 (a document
cut by a row boundary continues as a new segment in the next row) and `positions` restart at 0
with every segment, so a packed row is equivalent to its documents run one by one.
A batch is a dict with `input_ids`, `targets` (next token), `loss_mask` (0 where the next
token belongs to another segment and at the row end), `segment_ids` and `positions`, all
`[B, T]`.

Order: rows are shuffled once per epoch with `seed` (numpy PCG64), batch `i` of the run is
rows `perm[i*GB:(i+1)*GB]` of the global batch GB; host `p` of `P` takes its contiguous
`GB/P` slice. The iterator's whole state is `position` (batches consumed).
"""
from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from linjax.data import corpus as corpus_lib
from linjax.data.tokenizers import eos_id

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json",
                  ".json": "json", ".parquet": "parquet"}


# ---------------------------------------------------------------------------------------------
# Documents

def _is_saved_dataset(path: str) -> bool:
  return os.path.isdir(path) and any(
      os.path.exists(os.path.join(path, f))
      for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def resolve_files(path: str) -> list[str]:
  """Data files named by a file, a glob or a folder; raises naming the path if there are none."""
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.splitext(f)[1] in _FILE_BUILDERS)
  elif any(c in path for c in "*?["):
    files = sorted(glob.glob(path, recursive=True))
  else:
    files = [path] if os.path.exists(path) else []
  if not files:
    raise FileNotFoundError(f"no data files at {path!r}")
  exts = {os.path.splitext(f)[1] for f in files}
  if len(exts) != 1 or next(iter(exts)) not in _FILE_BUILDERS:
    raise ValueError(f"data files at {path!r} must share one of the extensions "
                     f"{sorted(_FILE_BUILDERS)}; found {sorted(exts)}")
  return files


def check_source(path) -> None:
  """Fails early (before any compute) when a data path does not exist."""
  if path in (None, "", "embedded"):
    return
  if _is_saved_dataset(path):
    return
  resolve_files(path)


def _load_path(path: str, text_field: str, split: str | None = None):
  import datasets
  if _is_saved_dataset(path):
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
      key = split if split in ds else ("train" if "train" in ds else next(iter(ds)))
      ds = ds[key]
  else:
    files = resolve_files(path)
    builder = _FILE_BUILDERS[os.path.splitext(files[0])[1]]
    kw = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=files, split="train",
                               cache_dir=os.path.join(corpus_lib.cache_dir(), "datasets"), **kw)
  if text_field not in ds.column_names:
    raise KeyError(f"data at {path!r} has no text field {text_field!r}; columns: "
                   f"{ds.column_names}")
  if text_field != "text":
    ds = ds.rename_column(text_field, "text")
  return ds.select_columns(["text"])


def load_documents(data_cfg, split: str):
  """A `datasets.Dataset` with one "text" column for split "train" or "eval"."""
  path = data_cfg.get("path")
  text_field = data_cfg.get("text_field", "text")
  if path in (None, "", "embedded"):
    # "eval" is the validation split (model selection while training), never "heldout"
    name = {"train": data_cfg.get("embedded_split", "train"), "eval": "val"}[split]
    return _load_path(corpus_lib.embedded_corpus_file(name), "text")
  if split == "eval" and data_cfg.get("eval_path"):
    return _load_path(data_cfg.eval_path, text_field, "validation")
  ds = _load_path(path, text_field, "train")
  frac = float(data_cfg.get("eval_fraction", 0.05))
  n_eval = int(round(len(ds) * frac)) if frac > 0 else 0
  if split == "eval":
    return ds.select(range(len(ds) - n_eval, len(ds)))
  return ds.select(range(len(ds) - n_eval)) if n_eval else ds


# ---------------------------------------------------------------------------------------------
# Tokenize and pack

class _Tokenize:
  """Picklable batched map function; `datasets` fingerprints it (with the tokenizer) for its
  cache, so a second run with the same data and tokenizer reads the cached arrow file."""

  def __init__(self, tokenizer, eos: int):
    self.tokenizer, self.eos = tokenizer, eos

  def __call__(self, batch):
    enc = self.tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [list(ids) + [self.eos] for ids in enc]}


def tokenize(docs, tokenizer, num_proc: int | None = None):
  return docs.map(_Tokenize(tokenizer, eos_id(tokenizer)), batched=True, batch_size=256,
                  remove_columns=docs.column_names, num_proc=num_proc,
                  desc="tokenize", load_from_cache_file=True)


@dataclasses.dataclass
class PackedData:
  tokens: np.ndarray        # [N, T] int32
  segment_ids: np.ndarray   # [N, T] int32, 1.. within each row
  positions: np.ndarray     # [N, T] int32, restart at 0 per segment

  def __len__(self):
    return self.tokens.shape[0]

  @property
  def seq_len(self):
    return self.tokens.shape[1]

  def rows(self, idx) -> dict:
    return make_batch(self.tokens[idx], self.segment_ids[idx], self.positions[idx])


def _flat_ids(tokenized):
  """(flat token ids, document lengths) straight from the arrow list column."""
  import pyarrow as pa
  col = tokenized.data.column("input_ids")
  col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
  if tokenized._indices is not None:   # a .select() view: go through python (small sets)
    docs = tokenized["input_ids"]
    lens = np.array([len(d) for d in docs], np.int64)
    flat = np.fromiter((t for d in docs for t in d), np.int64, count=int(lens.sum()))
    return flat, lens
  offsets = col.offsets.to_numpy()
  flat = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
  return flat.astype(np.int64), np.diff(offsets)


def pack(tokenized, seq_len: int, max_rows: int | None = None) -> PackedData:
  flat, lens = _flat_ids(tokenized)
  n = len(flat) // seq_len
  if max_rows is not None:
    n = min(n, max_rows)
  if n == 0:
    raise ValueError(f"data too small: {len(flat)} tokens give no row of seq_len={seq_len}")
  flat = flat[: n * seq_len]
  doc = np.repeat(np.arange(len(lens)), lens)[: n * seq_len]
  starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
  pos_in_doc = np.arange(n * seq_len) - starts[doc]
  doc, pos_in_doc = doc.reshape(n, seq_len), pos_in_doc.reshape(n, seq_len)
  # Segments restart at each row: a document cut by a row boundary starts again at 0.
  seg = doc - doc[:, :1] + 1
  positions = pos_in_doc - np.where(seg == 1, pos_in_doc[:, :1], 0)
  return PackedData(flat.reshape(n, seq_len).astype(np.int32), seg.astype(np.int32),
                    positions.astype(np.int32))


def make_batch(tokens, segment_ids, positions) -> dict:
  targets = np.zeros_like(tokens)
  targets[:, :-1] = tokens[:, 1:]
  mask = np.zeros(tokens.shape, np.float32)
  mask[:, :-1] = segment_ids[:, 1:] == segment_ids[:, :-1]
  return {"input_ids": tokens, "targets": targets, "loss_mask": mask,
          "segment_ids": segment_ids, "positions": positions}


def segment_ids_to_cu_seqlens(segment_ids) -> np.ndarray:
  """Cumulative sequence lengths of the flattened packed batch (fla's `cu_seqlens`)."""
  seg = np.asarray(segment_ids).reshape(-1)
  row = np.repeat(np.arange(np.asarray(segment_ids).shape[0]), np.asarray(segment_ids).shape[-1])
  change = np.ones(seg.shape, bool)
  change[1:] = (seg[1:] != seg[:-1]) | (row[1:] != row[:-1])
  return np.concatenate([np.nonzero(change)[0], [seg.size]]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Iteration

class DataIterator:
  """Deterministic, resumable batches of packed rows; see the module docstring for the order."""

  def __init__(self, data: PackedData, global_batch_size: int, seed: int = 0,
               shuffle: bool = True, position: int = 0, process_index: int | None = None,
               process_count: int | None = None):
    if process_index is None or process_count is None:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} not divisible by {process_count} hosts")
    if len(data) < global_batch_size:
      raise ValueError(f"only {len(data)} packed rows for a global batch of {global_batch_size}")
    self.data, self.gb, self.seed, self.shuffle = data, global_batch_size, seed, shuffle
    self.pidx, self.pcount = process_index, process_count
    self.position = position
    self._perm_epoch, self._perm = None, None

  @property
  def batches_per_epoch(self) -> int:
    return len(self.data) // self.gb

  def _order(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      n = len(self.data)
      self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n)
                    if self.shuffle else np.arange(n))
      self._perm_epoch = epoch
    return self._perm

  def indices(self, position: int) -> np.ndarray:
    epoch, i = divmod(position, self.batches_per_epoch)
    rows = self._order(epoch)[i * self.gb:(i + 1) * self.gb]
    local = self.gb // self.pcount
    return rows[self.pidx * local:(self.pidx + 1) * local]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self.data.rows(self.indices(self.position))
    self.position += 1
    return batch

  def state(self) -> dict:
    return {"position": int(self.position)}


def eval_batches(data: PackedData, batch_size: int, max_rows: int | None = None):
  """The held-out rows in order, in batches (the last one may be smaller)."""
  n = len(data) if max_rows is None else min(len(data), max_rows)
  for s in range(0, n, batch_size):
    yield data.rows(np.arange(s, min(s + batch_size, n)))
