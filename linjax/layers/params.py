"""Parameter kinds, so stage-wise recipes select trainable subsets with `nnx` filters.

  nnx.All(nnx.Param)     every weight
  LoRAParam              LoRA adapters (A, B); a subclass of `nnx.LoRAParam`
  FeatureMapParam        linear-attention feature maps, window factors, gate projections
                         introduced by linearizing (the LoLCATs stage-1 trainables)
Both are `nnx.Param` subclasses, so optimizers and checkpoints treat them as weights.
`param_count(module, filter)` counts the weights a filter selects.
"""
import jax
from flax import nnx


def param_count(module, flt=nnx.Param) -> int:
  """Number of scalars in the variables of `module` that `flt` selects (every weight by
  default; a trainable filter gives the trainable count)."""
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, flt))))


class LoRAParam(nnx.LoRAParam):
  """A LoRA adapter matrix (an `nnx.LoRAParam`, so NNX's own LoRA filters select it too)."""


class FeatureMapParam(nnx.Param):
  """A parameter added by linearization (feature map, window factor, ...)."""
