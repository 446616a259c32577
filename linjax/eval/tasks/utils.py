"""Loaders for linjax's local lm-eval tasks: jsonl files beside this file, no hub access.

Used through `custom_dataset: !function utils.<loader>` so the files are found wherever
the harness is started from (a relative `data_files:` would resolve against the CWD)."""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, **kwargs):
  import datasets
  return datasets.load_dataset("json", data_files={"test": os.path.join(_HERE, name)})


def tiny_mc(**kwargs):
  return _load("tiny_mc.jsonl")


def tiny_text(**kwargs):
  return _load("tiny_text.jsonl")


def tiny_gen(**kwargs):
  return _load("tiny_gen.jsonl")
