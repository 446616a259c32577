"""A linearized Llama (linjax export) as a transformers model: `LinjaxLlamaForCausalLM`.

    model = AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    out = model.generate(ids, max_new_tokens=32)      # decode state: O(1) per linear layer

The layers are transformers' Llama layers (RMSNorm, MLP, rotary) with the token mixer of
each layer taken from `config.mixers` (see `linjax_mixers`). The decode cache is a
`LinjaxCache`: one `LinjaxLayerCache` per layer holding that mixer's state (recurrent state,
window ring, or KV for softmax layers). Padding (attention_mask 0, any side) is skipped:
padded tokens are neither attended to nor folded into any state.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .linjax_hybrid import Liger, Lolcats
from .linjax_mixers import (GLA, DeltaNet, FeatureMap, GatedDeltaNet, LinearAttention, Lightning,
                            Retention, SlidingWindowAttention, SoftmaxAttention, Supra)
from .configuration_linjax import LinjaxLlamaConfig

# transformers 5.24 names the cache `cache` (was `past_key_values`)
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# --- the decode cache ---------------------------------------------------------------------

class LinjaxLayerCache(CacheLayerMixin):
  """One layer's decode state: a dict of tensors (batch first) that the mixer owns."""

  is_compileable = False
  is_croppable = False
  supports_early_init = False

  def __init__(self):
    super().__init__()
    self.state: dict = {}
    self.seen = 0            # tokens fed so far (padding included), for get_seq_length

  def lazy_initialization(self, key_states, value_states):
    pass

  def update(self, key_states, value_states, *args, **kwargs):
    raise NotImplementedError("linjax mixers keep their own state; Cache.update is not used")

  def get_mask_sizes(self, query_length):
    return self.seen + query_length, 0

  def get_seq_length(self):
    return self.seen

  def get_max_length(self):
    return -1

  @property
  def is_initialized(self):
    return bool(self.state)

  @is_initialized.setter
  def is_initialized(self, value):
    pass

  @property
  def batch_size(self):
    if not self.state:
      raise AttributeError("empty layer cache")
    return next(iter(self.state.values())).shape[0]

  def _map(self, fn):
    self.state = {k: fn(v) for k, v in self.state.items()}

  def reset(self):
    self.state, self.seen = {}, 0

  def reorder_cache(self, beam_idx):
    self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

  def batch_repeat_interleave(self, repeats):
    self._map(lambda x: x.repeat_interleave(repeats, dim=0))

  def batch_select_indices(self, indices):
    self._map(lambda x: x[indices])

  def offload(self):
    self._map(lambda x: x.to("cpu", non_blocking=True))

  def prefetch(self):
    pass

  def crop(self, tokens_to_remove):
    if tokens_to_remove:
      raise NotImplementedError("a recurrent state cannot drop tokens (crop): linjax mixers "
                                "fold every token into their state")


class LinjaxCache(Cache):
  """The decode state of every layer of a `LinjaxLlamaForCausalLM`."""

  def __init__(self, config=None, num_layers=None):
    n = num_layers if num_layers is not None else config.num_hidden_layers
    super().__init__(layers=[LinjaxLayerCache() for _ in range(n)])

  def get_seq_length(self, layer_idx: int = 0) -> int:
    return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

  @property
  def is_compileable(self):
    return False


# --- the model ----------------------------------------------------------------------------

MIXERS = {
    "softmax": SoftmaxAttention, "sliding_window": SlidingWindowAttention,
    "linear": LinearAttention, "retention": Retention, "lightning": Lightning, "gla": GLA,
    "deltanet": DeltaNet, "gated_deltanet": GatedDeltaNet, "supra": Supra,
    "lolcats": Lolcats, "liger": Liger,
}


def build_mixer(config, layer_idx):
  name, kwargs = config.layer_mixer(layer_idx)
  cls = MIXERS[name]
  try:
    return cls(config, layer_idx, **kwargs)
  except TypeError as e:
    raise ValueError(f"layer {layer_idx}: mixer {name!r} with kwargs {kwargs}: {e}") from e


class LinjaxLlamaDecoderLayer(nn.Module):
  def __init__(self, config, layer_idx):
    super().__init__()
    self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    self.self_attn = build_mixer(config, layer_idx)
    self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    self.mlp = LlamaMLP(config)

  def forward(self, x, *, cos, sin, positions, valid, cache):
    x = x + self.self_attn(self.input_layernorm(x), cos=cos, sin=sin, positions=positions,
                           valid=valid, cache=cache)
    return x + self.mlp(self.post_attention_layernorm(x))


class LinjaxLlamaPreTrainedModel(PreTrainedModel):
  config_class = LinjaxLlamaConfig
  config: LinjaxLlamaConfig
  base_model_prefix = "model"
  supports_gradient_checkpointing = False
  _no_split_modules = ["LinjaxLlamaDecoderLayer"]
  _supports_sdpa = False
  _supports_flash_attn = False
  _supports_attention_backend = False

  def _init_weights(self, module):
    """Linear / embedding / norm as transformers does; linjax's added parameters start
    where linjax starts them (identity maps, zero biases, window factor logit, gate bias)."""
    super()._init_weights(module)
    from transformers import initialization as init
    if isinstance(module, FeatureMap) and module.weight is not None:
      H, D, _ = module.weight.shape
      init.copy_(module.weight, torch.eye(D).expand(H, D, D))
      if module.bias is not None:
        init.zeros_(module.bias)
    elif isinstance(module, Lolcats):
      f = module.init_window_factor
      init.constant_(module.window_factors, math.log(f) - math.log1p(-f))
      if module.linear_factors is not None:
        init.constant_(module.linear_factors, float(module.init_linear_factor))
    elif isinstance(module, Liger) and module.window_mix is not None:
      init.constant_(module.window_mix, module.mix)
    elif isinstance(module, GLA):
      std = self.config.initializer_range
      init.normal_(module.gk_w1, std=std)
      init.normal_(module.gk_w2, std=std)
      init.constant_(module.gk_b, module.gate_bias_init)
    elif isinstance(module, DeltaNet):
      init.normal_(module.b_w, std=self.config.initializer_range)
      init.zeros_(module.b_b)
      if module.gated:
        init.normal_(module.a_w, std=self.config.initializer_range)
      if hasattr(module, "o_norm"):
        init.ones_(module.o_norm)
    elif isinstance(module, Supra):
      for w, b in ((module.phi_q_w, module.phi_q_b),) + (
          () if module.tied else ((module.phi_k_w, module.phi_k_b),)):
        init.copy_(w, torch.eye(w.shape[0]))
        init.zeros_(b)
      if module.norm_scale is not None:
        init.ones_(module.norm_scale)
        init.zeros_(module.norm_bias)


def _valid_mask(attention_mask, T):
  """[B, T] bool (True: a real token) from a 2D attention mask, or None (no padding)."""
  if attention_mask is None:
    return None
  if attention_mask.dim() != 2:
    raise ValueError("LinjaxLlama takes a 2D attention_mask [batch, past + new tokens] "
                     f"(1 = token, 0 = padding); got shape {tuple(attention_mask.shape)}")
  valid = attention_mask[:, -T:].bool()
  return None if bool(valid.all()) else valid


class LinjaxLlamaModel(LinjaxLlamaPreTrainedModel):
  def __init__(self, config: LinjaxLlamaConfig):
    super().__init__(config)
    self.padding_idx = config.pad_token_id
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
    self.layers = nn.ModuleList([LinjaxLlamaDecoderLayer(config, i)
                                 for i in range(config.num_hidden_layers)])
    self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    self.rotary_emb = LlamaRotaryEmbedding(config=config)
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
              inputs_embeds=None, use_cache=None, past_key_values=None, **kwargs):
    if cache is None:
      cache = past_key_values
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed_tokens(input_ids)
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if cache is not None and not isinstance(cache, LinjaxCache):
      raise TypeError(f"LinjaxLlama keeps its decode state in a LinjaxCache, got "
                      f"{type(cache).__name__}; pass cache=None (one is made) or a LinjaxCache")
    if use_cache and cache is None:
      cache = LinjaxCache(self.config)
    B, T = inputs_embeds.shape[:2]
    if position_ids is None:
      past = cache.get_seq_length() if cache is not None else 0
      position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None]
    position_ids = position_ids.expand(B, T).long()
    valid = _valid_mask(attention_mask, T)
    # rotary in float32; each mixer casts cos / sin to the tensor it rotates
    cos, sin = self.rotary_emb(inputs_embeds.float(), position_ids)
    x = inputs_embeds
    for i, layer in enumerate(self.layers):
      x = layer(x, cos=cos, sin=sin, positions=position_ids, valid=valid,
                cache=cache.layers[i] if cache is not None else None)
    if cache is not None:
      for lc in cache.layers:
        lc.seen += T
    return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                   **{_CACHE: cache if use_cache else None})


class LinjaxLlamaForCausalLM(LinjaxLlamaPreTrainedModel, GenerationMixin):
  _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

  def __init__(self, config: LinjaxLlamaConfig):
    super().__init__(config)
    self.model = LinjaxLlamaModel(config)
    self.vocab_size = config.vocab_size
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def set_input_embeddings(self, value):
    self.model.embed_tokens = value

  def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """generate() gets a LinjaxCache (transformers would make a DynamicCache)."""
    cache = model_kwargs.get(_CACHE)
    if cache is not None:
      cache._is_user_defined = True
      return
    if generation_config.use_cache is False:
      return
    impl = getattr(generation_config, "cache_implementation", None)
    if impl not in (None, "dynamic"):
      raise ValueError(f"cache_implementation={impl!r}: LinjaxLlama keeps its own decode state "
                       f"(a LinjaxCache); leave cache_implementation unset")
    model_kwargs[_CACHE] = LinjaxCache(self.config)

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
              inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
              past_key_values=None, **kwargs):
    out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, cache=cache if cache is not None else past_key_values,
                     inputs_embeds=inputs_embeds, use_cache=use_cache)
    h = out.last_hidden_state
    if isinstance(logits_to_keep, int):
      h = h[:, -logits_to_keep:] if logits_to_keep else h
    else:
      h = h[:, logits_to_keep]
    logits = self.lm_head(h)
    loss = None
    if labels is not None:
      loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE: getattr(out, _CACHE)})


__all__ = ["LinjaxLlamaForCausalLM", "LinjaxLlamaModel", "LinjaxLlamaPreTrainedModel",
           "LinjaxCache"]
