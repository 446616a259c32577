"""Parameter kinds, so stage-wise recipes select trainable subsets with `nnx` filters.

  nnx.All(nnx.Param)     every weight
  LoRAParam              LoRA adapters (A, B); a subclass of `nnx.LoRAParam`
  FeatureMapParam        linear-attention feature maps, window factors, gate projections
                         introduced by linearizing (the LoLCATs stage-1 trainables)
Both are `nnx.Param` subclasses, so optimizers and checkpoints treat them as weights.
"""
from flax import nnx


class LoRAParam(nnx.LoRAParam):
  """A LoRA adapter matrix (an `nnx.LoRAParam`, so NNX's own LoRA filters select it too)."""


class FeatureMapParam(nnx.Param):
  """A parameter added by linearization (feature map, window factor, ...)."""
