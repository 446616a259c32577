"""The Llama family in Flax NNX, with the token mixer chosen per layer.

    cfg = LlamaConfig.from_hf(json.load(open("config.json")), dtype="bfloat16")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    logits, _ = model(tokens)                                   # full pass
    cache = model.init_cache(batch_size, max_len)
    logits, cache = model(prompt, positions=pos, segment_ids=seg, cache=cache)   # prefill
    logits, cache = model(next_tok, cache=cache)                # decode (positions from cache)

Attribute names follow transformers (`embed_tokens`, `layers[i].self_attn.q_proj`, ...), so
the converter table is short. Every parameter carries logical axis names.

Layers: `config.scan_layers` runs a stack of identical layers (the same mixer and kwargs in
every layer, e.g. a fully linearized model or the softmax teacher) as one `jax.lax.scan`
over their stacked weights, so the model compiles one layer instead of L; layers that differ
(a hybrid stack, Lightning's per-layer decays) run as a Python loop. The weights stay stored
per layer (converters, LoRA and checkpoints see the same paths either way); the stack is
built inside the traced call (one transient copy of the layer weights, sharded like them).
`config.remat` checkpoints each layer in full-sequence passes: True (save nothing) or the name
of a `jax.checkpoint_policies` policy (e.g. "dots_with_no_batch_dims_saveable").
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from linjax.layers.mixers import build_mixer
from linjax.models import families
from linjax.layers.mlp import dense, partitioned
from linjax.layers.norms import RMSNorm
from linjax.layers.rotary import SUPPORTED_ROPE_TYPES
from linjax.layers.structured_mlp import build_mlp, resolve_mlp_fields


class UnsupportedConfigError(ValueError):
  """The HF config describes something linjax's Llama does not implement."""


# HF config keys with no effect on the forward pass (bookkeeping, generation defaults).
_IGNORED_HF_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "use_cache",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "attention_dropout", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "model_type", "rope_scaling", "rope_theta", "rope_parameters", "linjax", "_attn_implementation",
    "_attn_implementation_autoset", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "add_cross_attention",
    "tie_encoder_decoder", "cross_attention_hidden_size", "is_decoder", "pruned_heads",
    "torchscript", "tf_legacy_loss", "use_bfloat16", "output_scores", "return_dict_in_generate",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "num_beam_groups", "diversity_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "tf32", "quantization_config",
    "label_smoothing", "_commit_hash",
}

_LINJAX_FIELDS = ("mixers", "mixer_kwargs", "dtype", "param_dtype", "remat", "scan_layers",
                  "mlp", "mlp_rank", "mlp_blocks")
# (model families: linjax.models.families; their switches may also sit under "linjax")


@dataclasses.dataclass
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  initializer_range: float = 0.02
  bos_token_id: Any = None
  eos_token_id: Any = None
  pad_token_id: Any = None
  # the family (linjax.models.families): HF model_type and its switches
  model_type: str = "llama"            # llama | mistral | qwen2 | qwen3
  qkv_bias: bool = False               # q/k/v biases without an o_proj bias (Qwen2)
  qk_norm: bool = False                # RMSNorm of q and k per head before rotary (Qwen3)
  sliding_window: int | None = None    # softmax window of the sliding layers (Mistral, Qwen)
  layer_types: tuple | None = None     # per layer full_attention | sliding_attention
  # linjax fields
  mixers: tuple | None = None          # per-layer mixer names; default all "softmax"
  mixer_kwargs: Any = None             # one dict for all layers, or a per-layer sequence
  dtype: str = "float32"               # activation / compute dtype
  param_dtype: str = "float32"
  remat: Any = False                   # checkpoint each layer: False | True | a policy name
  scan_layers: bool = False            # lax.scan over identical layers (see module docstring)
  # FFN per layer (linjax.layers.structured_mlp): "dense" | "lowrank" | "block" | "blockdense",
  # rank (int or fraction of min(hidden, intermediate)) and block count, one or per layer
  mlp: Any = "dense"
  mlp_rank: Any = None
  mlp_blocks: Any = None

  def __post_init__(self):
    if self.num_key_value_heads is None:
      self.num_key_value_heads = self.num_attention_heads
    if self.head_dim is None:
      self.head_dim = self.hidden_size // self.num_attention_heads
    if self.num_attention_heads % self.num_key_value_heads:
      raise UnsupportedConfigError(
          f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
          f"num_key_value_heads ({self.num_key_value_heads})")
    self.dtype = jnp.dtype(self.dtype).name
    self.param_dtype = jnp.dtype(self.param_dtype).name
    if self.mixers is None:
      self.mixers = ("softmax",) * self.num_hidden_layers
    elif isinstance(self.mixers, str):
      self.mixers = (self.mixers,) * self.num_hidden_layers
    self.mixers = tuple(self.mixers)
    if len(self.mixers) != self.num_hidden_layers:
      raise UnsupportedConfigError(
          f"mixers has {len(self.mixers)} entries for {self.num_hidden_layers} layers")
    mk = self.mixer_kwargs
    if mk is not None and not isinstance(mk, dict):
      mk = tuple(dict(d or {}) for d in mk)
      if len(mk) != self.num_hidden_layers:
        raise UnsupportedConfigError(
            f"mixer_kwargs has {len(mk)} entries for {self.num_hidden_layers} layers")
      self.mixer_kwargs = mk
    if not isinstance(self.remat, bool) and not (
        isinstance(self.remat, str) and hasattr(jax.checkpoint_policies, self.remat)):
      raise UnsupportedConfigError(
          f"remat must be a bool or the name of a jax.checkpoint_policies policy, got "
          f"{self.remat!r}")
    try:
      self.mlp, self.mlp_rank, self.mlp_blocks = resolve_mlp_fields(
          self.mlp, self.mlp_rank, self.mlp_blocks, self.hidden_size, self.intermediate_size,
          self.num_hidden_layers)
    except ValueError as e:
      raise UnsupportedConfigError(str(e)) from None
    if self.hidden_act not in ("silu",):
      raise UnsupportedConfigError(f"hidden_act {self.hidden_act!r} is not supported (silu)")
    _check_rope(self.rope_scaling)
    try:
      families.check_model_type(self.model_type)
      self.layer_types = families.check_layer_types(self.layer_types, self.num_hidden_layers)
      families._window(self.sliding_window, "LlamaConfig")
    except families.UnsupportedFamilyError as e:
      raise UnsupportedConfigError(str(e)) from None

  # hashable, so the config can sit in an nnx graphdef (jit cache key)
  def __hash__(self):
    return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def layer_mixer_kwargs(self, i: int) -> dict:
    if self.mixer_kwargs is None:
      return {}
    if isinstance(self.mixer_kwargs, dict):
      return dict(self.mixer_kwargs)
    return dict(self.mixer_kwargs[i])

  def layer_window(self, i: int):
    """The softmax window of layer i in the teacher's architecture (None: full attention)."""
    return families.layer_windows(self)[i]

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["mixers"] = list(self.mixers)
    if self.mixer_kwargs is not None and not isinstance(self.mixer_kwargs, dict):
      d["mixer_kwargs"] = [dict(x) for x in self.mixer_kwargs]
    return d

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
    """Build from an HF `config.json` dict (transformers 4 or 5 layout) of a Llama, Mistral,
    Qwen2 / Qwen2.5 or Qwen3 (`linjax.models.families`).

    A nested "linjax" dict (written by `to_hf`) restores the linjax fields; `overrides`
    win over both. Unknown keys or unsupported values raise `UnsupportedConfigError`.
    """
    hf = dict(hf)
    mt = hf.get("model_type")
    try:
      families.check_model_type(mt, hf.get("architectures"))
      family = families.parse(mt, hf)
    except families.UnsupportedFamilyError as e:
      raise UnsupportedConfigError(str(e)) from None
    if hf.get("pretraining_tp", 1) != 1:
      raise UnsupportedConfigError(f"pretraining_tp={hf['pretraining_tp']} is not supported")
    hf.pop("pretraining_tp", None)
    if hf.get("attention_dropout", 0.0):
      raise UnsupportedConfigError("attention_dropout > 0 is not supported")
    # rope: transformers 5 puts everything in rope_parameters; 4 uses rope_theta + rope_scaling
    rp = hf.get("rope_parameters")
    if rp:
      rp = dict(rp)
      theta = rp.pop("rope_theta", hf.get("rope_theta", 10000.0))
      rtype = rp.get("rope_type", rp.get("type", "default"))
      scaling = None if rtype == "default" else rp
    else:
      theta = hf.get("rope_theta", 10000.0)
      scaling = hf.get("rope_scaling")
      if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    if scaling is not None:
      scaling = dict(scaling)
      if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
      scaling.pop("type", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in hf if (k not in fields and k not in _IGNORED_HF_KEYS)
                     or k in families.FEATURES)   # a switch this family's HF config lacks
    if unknown:
      raise UnsupportedConfigError(f"unsupported HF config keys (not implemented) for "
                                   f"model_type {mt!r}: {unknown}")
    kw = {k: v for k, v in hf.items()
          if k in fields and k not in _LINJAX_FIELDS and k not in ("rope_theta", "rope_scaling")}
    kw["rope_theta"] = float(theta)
    kw["rope_scaling"] = scaling
    kw["model_type"] = mt
    kw.update(family)
    if kw.get("head_dim") is None:
      kw.pop("head_dim", None)
    for k, v in (hf.get("linjax") or {}).items():
      if k not in _LINJAX_FIELDS and k not in families.FEATURES:
        raise UnsupportedConfigError(f"unknown linjax config field {k!r}")
      kw[k] = v
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """An HF `config.json` dict (transformers 4 and 5 both read it); linjax fields under
    "linjax" (transformers ignores them)."""
    d = {
        "architectures": [families.ARCHITECTURES[self.model_type][0]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "tie_word_embeddings": self.tie_word_embeddings, **families.hf_keys(self),
        "hidden_act": self.hidden_act, "initializer_range": self.initializer_range,
        "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id, "torch_dtype": self.param_dtype,
    }
    d["linjax"] = {"mixers": list(self.mixers), "mixer_kwargs": self.to_dict()["mixer_kwargs"],
                   "dtype": self.dtype, "param_dtype": self.param_dtype, "remat": self.remat,
                   "scan_layers": self.scan_layers}
    if not self.all_dense_mlp:
      d["linjax"].update(mlp=list(self.mlp), mlp_rank=list(self.mlp_rank),
                         mlp_blocks=list(self.mlp_blocks))
    if not families.expressible(self):   # switches the family's HF keys cannot say
      d["linjax"].update({k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in ((k, getattr(self, k)) for k in families.FEATURES)})
    return d

  @property
  def all_dense_mlp(self) -> bool:
    return all(k == "dense" for k in self.mlp)

  @property
  def all_softmax(self) -> bool:
    return all(m == "softmax" for m in self.mixers) and not any(
        self.layer_mixer_kwargs(i) for i in range(self.num_hidden_layers))


def _check_rope(scaling):
  if scaling is None:
    return
  rtype = scaling.get("rope_type", scaling.get("type"))
  if rtype not in SUPPORTED_ROPE_TYPES:
    raise UnsupportedConfigError(
        f"unsupported rope_scaling type {rtype!r}; supported: {SUPPORTED_ROPE_TYPES}")
  need = {"linear": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rtype, ())
  missing = [k for k in need if k not in scaling]
  if missing:
    raise UnsupportedConfigError(f"rope_scaling {rtype!r} lacks {missing}")
  known = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
           "original_max_position_embeddings"}
  extra = sorted(set(scaling) - known)
  if extra:
    raise UnsupportedConfigError(f"unsupported rope_scaling keys {extra}")


class LlamaDecoderLayer(nnx.Module):
  def __init__(self, config: LlamaConfig, layer_idx: int, *, rngs: nnx.Rngs):
    kw = dict(eps=config.rms_norm_eps, dtype=config.jnp_dtype,
              param_dtype=config.jnp_param_dtype)
    self.input_layernorm = RMSNorm(config.hidden_size, **kw)
    self.self_attn = build_mixer(config.mixers[layer_idx], config, layer_idx, rngs=rngs,
                                 **config.layer_mixer_kwargs(layer_idx))
    self.post_attention_layernorm = RMSNorm(config.hidden_size, **kw)
    self.mlp = build_mlp(config, layer_idx, rngs=rngs)

  def __call__(self, x, *, positions, segment_ids=None, cache=None, trace=None):
    h = self.input_layernorm(x)
    a, cache = self.self_attn(h, positions=positions, segment_ids=segment_ids, cache=cache)
    if trace is not None:
      trace["mixer_inputs"].append(h)
      trace["mixer_outputs"].append(a)
    x = x + a
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, cache


def remat_policy(remat):
  """None (no remat), or the `jax.checkpoint` policy named by config.remat."""
  if remat is False or remat is None:
    return None
  return jax.checkpoint_policies.nothing_saveable if remat is True else getattr(
      jax.checkpoint_policies, remat)


def _layer_fwd(layer, x, positions, segment_ids):
  return layer(x, positions=positions, segment_ids=segment_ids)[0]


def _stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _unstack(tree, n):
  return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(n)]


def _raise_bad_ids(n_bad, lo, hi, vocab):
  if n_bad:
    raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocab_size), got "
                     f"{int(n_bad)} id(s) outside, min {int(lo)}, max {int(hi)}: is the "
                     f"tokenizer the model's?")


def _check_token_ids(tokens, vocab, decoding):
  from linjax.ops import _checks
  t = _checks.concrete(tokens)
  if t is not None:
    if t.size:
      bad = (t < 0) | (t >= vocab)
      _raise_bad_ids(bad.sum(), t.min(), t.max(), vocab)
  elif decoding or _checks._TRACED[0]:
    bad = (tokens < 0) | (tokens >= vocab)
    jax.debug.callback(_raise_bad_ids, bad.sum(), tokens.min(), tokens.max(), vocab)


class Llama(nnx.Module):
  """Llama causal LM; `self_attn` of layer i is the mixer `config.mixers[i]`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=config.jnp_dtype,
        param_dtype=config.jnp_param_dtype,
        embedding_init=partitioned(nnx.initializers.normal(config.initializer_range),
                                   ("vocab", "embed")),
        rngs=rngs)
    self.layers = nnx.List([LlamaDecoderLayer(config, i, rngs=rngs)
                            for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=config.jnp_dtype,
                        param_dtype=config.jnp_param_dtype)
    if not config.tie_word_embeddings:
      self.lm_head = dense(config.hidden_size, config.vocab_size, ("embed", "vocab"),
                           dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype,
                           rngs=rngs, std=config.initializer_range)
    else:
      self.lm_head = None

  def init_cache(self, batch_size: int, max_len: int, dtype=None):
    """Decode state: {"layers": per-layer mixer caches, "next_pos": [B] int32}."""
    dtype = dtype or self.config.jnp_dtype
    return {"layers": [layer.self_attn.init_cache(batch_size, max_len, dtype)
                       for layer in self.layers],
            "next_pos": jnp.zeros((batch_size,), jnp.int32)}

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None,
               return_hidden: bool = False, last_only: bool = False):
    """tokens [B, T] -> (logits [B, T, vocab] float32, cache), plus a dict of per-layer
    activations when return_hidden (see `hidden_states`). last_only: logits of the last
    position alone ([B, 1, vocab]; a prefill needs no more, and the LM head over every
    position is T x vocab of work).

    positions default to 0..T-1 (or continue from cache["next_pos"] when decoding);
    segment_ids [B, T]: packed documents (full pass) or 1 = token / 0 = padding (decode).
    Token ids must be in [0, vocab_size): concrete ids are checked now, traced ones when
    decoding (a cache is given) or under `linjax.ops._checks.traced_value_checks()`
    (ValueError naming the id; unchecked, an id out of range gives NaN logits).
    """
    x, new_layers, positions, trace = self._body(tokens, positions, segment_ids, cache,
                                                 return_hidden)
    if trace is not None:
      trace["final"] = x
    logits = self.head(x[:, -1:] if last_only else x)
    if cache is not None:
      real = positions if segment_ids is None else jnp.where(segment_ids > 0, positions, -1)
      cache = {"layers": new_layers,
               "next_pos": jnp.maximum(cache["next_pos"], jnp.max(real, axis=1) + 1)}
    if return_hidden:
      return logits, cache, trace
    return logits, cache

  def _body(self, tokens, positions, segment_ids, cache, return_hidden):
    """Embedding and layers: (x [B, T, d] before the final norm, new layer caches, positions,
    trace or None)."""
    B, T = tokens.shape
    _check_token_ids(tokens, self.config.vocab_size, cache is not None)
    if positions is None:
      start = cache["next_pos"][:, None] if cache is not None else 0
      positions = jnp.arange(T, dtype=jnp.int32)[None, :] + start
      positions = jnp.broadcast_to(positions, (B, T))
    positions = positions.astype(jnp.int32)
    x = self.embed_tokens(tokens)
    trace = {"layer_inputs": [], "mixer_inputs": [], "mixer_outputs": []} if return_hidden else None
    policy = remat_policy(self.config.remat) if cache is None else None
    if self.config.scan_layers and trace is None and self._scannable():
      x, new_layers = self._scan(x, positions, segment_ids,
                                 None if cache is None else cache["layers"], policy)
    else:
      new_layers = []
      for i, layer in enumerate(self.layers):
        if trace is not None:
          trace["layer_inputs"].append(x)
        if policy is not None and trace is None:
          x = nnx.remat(_layer_fwd, policy=policy)(layer, x, positions, segment_ids)
          c = None
        else:
          x, c = layer(x, positions=positions, segment_ids=segment_ids,
                       cache=None if cache is None else cache["layers"][i], trace=trace)
        new_layers.append(c)
    return x, new_layers, positions, trace

  def head(self, x):
    """The final norm and LM head: the last layer's output [..., d] -> logits [..., vocab]
    float32. `final_hidden` then `head` is `__call__` without the cache; a loss can apply
    the head to a few positions at a time (`stage.loss_chunk`)."""
    x = self.norm(x)
    logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits.astype(jnp.float32)

  def final_hidden(self, tokens, positions=None, segment_ids=None):
    """The last layer's output [B, T, d] of a full pass (before the final norm): what the LM
    head reads, without the [B, T, vocab] logits."""
    return self._body(tokens, positions, segment_ids, None, False)[0]

  def _scannable(self) -> bool:
    """True when every layer has the same structure (graphdef) and none is distilling."""
    g0 = nnx.graphdef(self.layers[0])
    same = all(nnx.graphdef(l) == g0 for l in self.layers[1:])
    distilling = any(getattr(l.self_attn, "distill", None) for l in self.layers)
    if not same:
      warnings.warn("scan_layers: the layers differ (mixers, kwargs or per-layer constants); "
                    "running them as a loop", stacklevel=3)
    return same and not distilling

  def _scan(self, x, positions, segment_ids, caches, policy):
    """The layers as one lax.scan over their stacked states (and stacked caches)."""
    n = len(self.layers)
    gdef = nnx.graphdef(self.layers[0])
    stacked = _stack([nnx.state(l) for l in self.layers])
    cs = None if caches is None else _stack(caches)

    def body(x, xs):
      st, c = xs
      x, c = nnx.merge(gdef, st)(x, positions=positions, segment_ids=segment_ids, cache=c)
      return x, c

    if policy is not None:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, new = jax.lax.scan(body, x, (stacked, cs))
    return x, ([None] * n if caches is None else _unstack(new, n))

  def hidden_states(self, tokens, positions=None, segment_ids=None) -> dict:
    """Teacher-forced activations of a full pass: lists (one per layer) "layer_inputs"
    (residual stream entering layer i), "mixer_inputs" (input_layernorm output, what
    self_attn sees), "mixer_outputs" (self_attn output), and "final" (before the last norm)."""
    return self(tokens, positions, segment_ids, return_hidden=True)[2]
