"""Data: the embedded corpus and its decontaminated splits, tokenizers, the training data
pipeline (load, tokenize, pack, resumable iteration), and teacher-generated text.

  embedded_corpus(split)        "train" | "val" | "heldout" (disjoint by 13-grams) | ...
  load_tokenizer(name)          "byte" | "smollm2" | a .gguf file | an HF tokenizer folder
  heldout_tokens(tok, n)        the first n tokens of the held-out split (what eval scores)
  pipeline.{load_documents, tokenize, pack, DataIterator}
  teacher_text.generate_corpus  text sampled from a teacher, seeded and cached

`train` and `eval` both sit on top of this package; it imports neither.
"""
_LAZY = {
    "embedded_corpus": ("linjax.data.corpus", "embedded_corpus"),
    "corpus_report": ("linjax.data.corpus", "corpus_report"),
    "load_tokenizer": ("linjax.data.tokenizers", "load_tokenizer"),
    "smollm2_gguf_path": ("linjax.data.tokenizers", "smollm2_gguf_path"),
    "ByteTokenizer": ("linjax.data.tokenizers", "ByteTokenizer"),
    "heldout_tokens": ("linjax.data.streams", "heldout_tokens"),
    "token_stream": ("linjax.data.streams", "token_stream"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    import importlib
    mod, attr = _LAZY[name]
    return getattr(importlib.import_module(mod), attr)
  raise AttributeError(f"module 'linjax.data' has no attribute {name!r}")
