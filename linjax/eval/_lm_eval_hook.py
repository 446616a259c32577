"""Registers "linjax" with lm-eval whenever lm-eval loads its model table.

Imported at interpreter start by the `linjax_lm_eval.pth` file that
`linjax.eval.lm_eval_adapter.install_plugin()` writes; it imports nothing heavy. It waits
for `lm_eval.models` (which lm-eval imports when a model is first looked up by name) and
then adds a lazy placeholder, so `lm_eval --model linjax` loads the adapter on demand.
"""
import importlib.abc
import sys

_TARGET = "lm_eval.models"
_PLACEHOLDER = "linjax.eval.lm_eval_adapter:LinjaxLM"


def _register():
  from lm_eval.api.registry import model_registry
  if "linjax" not in model_registry:
    model_registry.register("linjax", target=_PLACEHOLDER)


class _Finder(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name != _TARGET:
      return None
    sys.meta_path.remove(self)
    try:
      import importlib.util
      spec = importlib.util.find_spec(name)
    finally:
      sys.meta_path.insert(0, self)
    if spec is None or spec.loader is None:
      return spec
    loader = spec.loader
    orig_exec = loader.exec_module

    def exec_module(module):
      orig_exec(module)
      try:
        _register()
      except Exception:  # never break lm-eval itself
        pass
    loader.exec_module = exec_module
    return spec


if _TARGET in sys.modules:
  _register()
elif not any(isinstance(f, _Finder) for f in sys.meta_path):
  sys.meta_path.insert(0, _Finder())
