"""The embedded default corpus: real English text that ships with Python, no download.

Two sources, both part of every CPython install:

* `pydoc_data.topics.topics`: the help() topics of the Python reference manual (operators,
  statements, the data model, ...), ~80 documents, ~0.45M characters on Python 3.11.
* docstrings of the standard library: every module / class / function docstring of at least
  `MIN_DOCSTRING_CHARS` characters in the stdlib `.py` files, collected with `ast` (no
  import), one document per module, files and nodes in a fixed (sorted, source) order.
  Test suites, `idlelib`, `lib2to3`, `turtledemo` and `site-packages` are skipped.
  ~1.2M characters on Python 3.11.

Splits (`embedded_corpus(split)`):

  "heldout"  the pydoc topics `sorted(topics)[7::8]` (every 8th topic): the fixed held-out
             text linjax reports perplexity on (DESIGN.md: "held-out pydoc text", 6 x 512
             tokens are taken from its start by the evaluators).
  "pydoc"    the other pydoc topics.
  "stdlib"   the stdlib docstrings.
  "train"    "pydoc" followed by "stdlib": the default training set.

Each call returns a list of `{"id": str, "text": str}` documents. The contents depend on the
Python version (the docs change between releases), so the cache file names carry it. The
docstrings are cached under `$LINJAX_CACHE` (default `~/.cache/linjax`) after the first
parse (~3 s).

To train on real data instead, point `config.data.path` at local text / jsonl / parquet
files or a `datasets.save_to_disk` folder (see `linjax.train.data`).
"""
from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig

MIN_DOCSTRING_CHARS = 200
HELDOUT_SLICE = slice(7, None, 8)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
              "turtledemo", "__pycache__", "ensurepip"}
SPLITS = ("train", "heldout", "pydoc", "stdlib")


def cache_dir() -> str:
  d = os.environ.get("LINJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "linjax")
  os.makedirs(d, exist_ok=True)
  return d


def python_tag() -> str:
  return f"py{sys.version_info.major}{sys.version_info.minor}"


def _pydoc_topics() -> list[tuple[str, str]]:
  from pydoc_data.topics import topics
  return [(k, topics[k]) for k in sorted(topics)]


def pydoc_split(heldout: bool) -> list[dict]:
  items = _pydoc_topics()
  held = {k for k, _ in items[HELDOUT_SLICE]}
  return [{"id": f"pydoc:{k}", "text": v.strip()} for k, v in items
          if (k in held) == heldout and v.strip()]


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


def embedded_corpus(split: str = "train") -> list[dict]:
  """Documents `{"id", "text"}` of one split of the embedded corpus (see module docstring)."""
  if split == "heldout":
    return pydoc_split(heldout=True)
  if split == "pydoc":
    return pydoc_split(heldout=False)
  if split == "stdlib":
    return stdlib_split()
  if split == "train":
    return pydoc_split(heldout=False) + stdlib_split()
  raise ValueError(f"unknown embedded corpus split {split!r}; one of {SPLITS}")


def embedded_corpus_file(split: str = "train") -> str:
  """The split written as a jsonl file in the cache (what `datasets` loads and caches)."""
  if split not in SPLITS:
    raise ValueError(f"unknown embedded corpus split {split!r}; one of {SPLITS}")
  path = os.path.join(cache_dir(), f"corpus_v2_{split}_{python_tag()}.jsonl")
  if not os.path.exists(path):
    write_jsonl(embedded_corpus(split), path)
  return path
