"""Evaluation: perplexity, top-1 agreement, recall (MQAR, passkey), the quick suite, and
the lm-eval-harness adapter (`linjax.eval.lm_eval_adapter`, imported on demand)."""
from linjax.eval.metrics import PerplexityResult, perplexity, top1_agreement

__all__ = ["evaluate", "perplexity", "top1_agreement", "PerplexityResult"]


def __getattr__(name):
  if name == "evaluate":
    from linjax.eval.suite import evaluate
    return evaluate
  raise AttributeError(f"module 'linjax.eval' has no attribute {name!r}")
