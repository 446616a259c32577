"""The linjax mixers the PyTorch modeling code implements, and their keyword arguments.

Pure Python (no torch): `linjax.convert.save_pretrained` reads it to refuse, before writing
anything, a model whose mixers or mixer kwargs this modeling code does not implement; the
exported `configuration_linjax.py` reads it to check a config.json.

Each entry: mixer name -> {kwarg: default}. The defaults are linjax's (the parity tests in
tests/test_hf_export.py build every mixer with them, so a change on one side fails there).
`EXECUTION_KWARGS` choose how a mixer runs, not what it computes: they are not exported.
"""

MODEL_TYPE = "linjax_llama"
ARCHITECTURE = "LinjaxLlamaForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_linjax.LinjaxLlamaConfig",
            "AutoModel": "modeling_linjax.LinjaxLlamaModel",
            "AutoModelForCausalLM": "modeling_linjax.LinjaxLlamaForCausalLM"}
# the files copied into an export, beside config.json
FILES = ("configuration_linjax.py", "modeling_linjax.py", "linjax_spec.py", "linjax_ops.py",
         "linjax_window.py", "linjax_mixers.py", "linjax_hybrid.py")

EXECUTION_KWARGS = ("method", "mode")

_LINEAR = dict(feature_map="hedgehog", normalize="denominator", rotary="before", tie_qk=False,
               decay=None)

MIXERS = {
    "softmax": dict(window=None, num_sinks=0),
    "sliding_window": dict(window=64, num_sinks=4),
    "linear": dict(_LINEAR),
    "retention": dict(_LINEAR, feature_map="identity", normalize="groupnorm", decay="retnet"),
    "lightning": dict(_LINEAR, feature_map="identity", normalize="groupnorm", decay="lightning"),
    "gla": dict(_LINEAR, feature_map="identity", normalize="groupnorm", gate_logit_normalizer=16.0,
                gate_low_rank_dim=16, gate_bias_init=4.0),
    "deltanet": dict(feature_map="silu_l2", allow_neg_eigval=False, gated=False, rotary="before",
                     normalize="rmsnorm"),
    "gated_deltanet": dict(feature_map="silu_l2", allow_neg_eigval=False, gated=True,
                           rotary="before", normalize="rmsnorm"),
    "supra": dict(decay="alibi", norm_affine=False),
    "lolcats": dict(window=64, variant="sw", feature_map="hedgehog", init_window_factor=0.1,
                    num_sinks=0, init_linear_factor=None),
    "liger": dict(window=64, gate_logit_normalizer=16.0, mix=0.5, num_sinks=0, normalize=False,
                  learn_mix=False),
}


class UnknownMixerError(ValueError):
  """A mixer (or a mixer kwarg) that this modeling code does not implement."""


def check_mixer(name, kwargs, where=""):
  """Raise `UnknownMixerError` naming an unknown mixer or kwarg; returns the kwargs without
  the execution-only ones."""
  at = f" ({where})" if where else ""
  if name not in MIXERS:
    raise UnknownMixerError(f"mixer {name!r}{at} has no PyTorch implementation in linjax's "
                            f"modeling code; implemented: {sorted(MIXERS)}")
  kwargs = {k: v for k, v in dict(kwargs or {}).items() if k not in EXECUTION_KWARGS}
  unknown = sorted(set(kwargs) - set(MIXERS[name]))
  if unknown:
    raise UnknownMixerError(f"mixer {name!r}{at}: kwargs {unknown} are not implemented by "
                            f"linjax's PyTorch modeling code (it knows {sorted(MIXERS[name])})")
  return kwargs


def pack(mixers, kwargs):
  """Per-layer names and kwargs -> the compact config.json form.

  "mixers": one name for every layer, or a list (one per layer);
  "mixer_kwargs": {name: kwargs} when every layer of a mixer shares them (stored once), else
  a list (one dict per layer).
  """
  mixers, kwargs = list(mixers), [dict(k or {}) for k in kwargs]
  by_name = {}
  for m, k in zip(mixers, kwargs):
    if by_name.setdefault(m, k) != k:
      by_name = None
      break
  packed_mixers = mixers[0] if len(set(mixers)) == 1 else mixers
  if by_name is None:
    return packed_mixers, kwargs
  return packed_mixers, ({m: k for m, k in by_name.items() if k} or None)


def unpack(mixers, mixer_kwargs, num_layers):
  """The compact form -> (names, kwargs), one per layer; checks lengths and types."""
  if mixers is None:
    mixers = "softmax"
  names = [mixers] * num_layers if isinstance(mixers, str) else list(mixers)
  if len(names) != num_layers:
    raise ValueError(f"config: mixers has {len(names)} entries for {num_layers} layers")
  if mixer_kwargs is None:
    kws = [{} for _ in names]
  elif isinstance(mixer_kwargs, dict):
    stray = sorted(set(mixer_kwargs) - set(names))
    if stray:
      raise ValueError(f"config: mixer_kwargs names mixers no layer uses: {stray}")
    kws = [dict(mixer_kwargs.get(n) or {}) for n in names]
  else:
    kws = [dict(k or {}) for k in mixer_kwargs]
    if len(kws) != num_layers:
      raise ValueError(f"config: mixer_kwargs has {len(kws)} entries for {num_layers} layers")
  return names, kws


def resolved(name, kwargs):
  """The full kwargs of one layer: the defaults of `name` updated by `kwargs`."""
  out = dict(MIXERS[name])
  out.update(check_mixer(name, kwargs))
  return out
