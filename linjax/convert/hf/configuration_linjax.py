"""`LinjaxLlamaConfig`: a Llama config whose layers name their token mixers (linjax export).

Written by `linjax.save_pretrained` for a model with any non-softmax mixer; loaded with
`transformers.AutoConfig.from_pretrained(dir, trust_remote_code=True)`. Beyond
`LlamaConfig`'s keys it has

  mixers        one mixer name for every layer, or a list with one per layer
  mixer_kwargs  {mixer name: kwargs} (shared by every layer of that mixer) or a list of dicts,
                one per layer
  base_model_type  the family the model was linearized from (llama, mistral, qwen2, qwen3)
  qkv_bias      q/k/v biases without an o_proj bias (Qwen2)
  qk_norm       RMSNorm of q and k per head before rotary (Qwen3)
  sliding_window, layer_types   the teacher's sliding window (Mistral: every layer; Qwen: the
                layers layer_types marks "sliding_attention"), the default of softmax layers

Mixer names and kwargs are linjax's (see `linjax_spec.MIXERS`).
"""
from __future__ import annotations

from transformers import LlamaConfig

from .linjax_spec import MODEL_TYPE, check_mixer, unpack

try:  # transformers 5 configs are strict dataclasses: new fields must be declared
  from huggingface_hub.dataclasses import strict
except ImportError:  # pragma: no cover - older huggingface_hub
  strict = None


class LinjaxLlamaConfig(LlamaConfig):
  model_type = MODEL_TYPE
  mixers: str | list | None = None
  mixer_kwargs: dict | list | None = None
  base_model_type: str = "llama"
  qkv_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  layer_types: list | None = None

  def __post_init__(self, **kwargs):
    super().__post_init__(**kwargs)
    names, kws = unpack(self.mixers, self.mixer_kwargs, self.num_hidden_layers)
    for i, (n, k) in enumerate(zip(names, kws)):
      check_mixer(n, k, where=f"layer {i}")

  def layer_mixer(self, i: int) -> tuple[str, dict]:
    """(mixer name, its kwargs) of layer i."""
    names, kws = unpack(self.mixers, self.mixer_kwargs, self.num_hidden_layers)
    return names[i], check_mixer(names[i], kws[i])


if strict is not None:
  LinjaxLlamaConfig = strict(LinjaxLlamaConfig)

__all__ = ["LinjaxLlamaConfig"]
