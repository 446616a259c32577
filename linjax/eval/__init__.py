"""Evaluation: perplexity, top-1 agreement, recall probes (MQAR, passkey), the quick suite
and the lm-eval-harness adapter.

  linjax.eval.perplexity(model, docs, seq_len=...)       sliding-window perplexity
  linjax.eval.top1_agreement(student, teacher, docs)     argmax agreement
  linjax.eval.evaluate(model, tokenizer=..., teacher=..) the quick suite (a dict)
  linjax.eval.recall                                     MQAR / passkey generators, scorers
  linjax.eval.lm_eval_adapter                            `lm_eval --model linjax`
  linjax.eval.cli.main(argv)                             `linjax eval ...`

Names load lazily, so importing `linjax.eval._lm_eval_hook` (run at every interpreter start
once the lm-eval plugin is installed) does not import jax.
"""
_LAZY = {
    "perplexity": "linjax.eval.metrics",
    "top1_agreement": "linjax.eval.metrics",
    "PerplexityResult": "linjax.eval.metrics",
    "evaluate": "linjax.eval.suite",
}

__all__ = ["evaluate", "perplexity", "top1_agreement", "PerplexityResult"]


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'linjax.eval' has no attribute {name!r}")
