"""The recurrent transformer (Kausik, "Scaling Efficient LLMs", arXiv 2402.14746).

One transformer block (a Llama decoder layer: RMSNorm, softmax attention with rotary, SwiGLU
or a structured FFN) is applied progressively to a sliding window of `w` tokens, carrying
state from window to window. Each step runs the block once on 2w positions: the first half
holds the state, the second half the next window's inputs. With W_k the inputs (embeddings,
or the previous layer's outputs) of window k, and a = sigmoid(alpha_logit) a learned scalar:

  Q_k     = a * R_{k-2} + W_k                          the window's inputs, plus memory
  [R_{k-1}; H_k] = Block([P_k; Q_k])                   causal attention over the 2w positions
  P_{k+1} = a * R_{k-1} + H_k                          the state the next step attends to

R_j is the layer's output for window j (emitted by step j + 1: the first half of the block
is causal, so R_{k-1} = Block(P_k) does not see Q_k). This is the recurrence of the author's
code (bnkausik, "recursive transformer for selective copying"): `x1 = cat(a*x1[:, :w] +
x1[:, w:], a*x1[:, :w] + x[:, i:i+w]); x1 = block(x1)`, output `x1[:, :w]`, per layer. The
memory added to window k is R_{k-2}, two windows back: the one block call per window that
yields both R_{k-1} and H_k is what makes the step parallel over its 2w positions.
a -> 0 forgets history; a -> 1 accumulates it (copy, selective copy).

Stability: the block is pre-norm, so its residual stream carries the state additively and
the recurrence grows like x_{k+1} = a x_k + a x_{k-1} + ..., by a factor
(a + sqrt(a^2 + 4a)) / 2 per window: bounded for a <= 1/2 (the init, 0.5, is the edge),
exponential above (a = 0.9: x1.5 per window, inf in float32 after ~1.5k windows).
`mixing="convex"` (a linjax option, not in the paper) uses a * R + (1 - a) * X in both
places instead, whose growth factor is below 1 for every a in (0, 1).

Cost: T / w steps of a block over 2w positions: O(T w) time, O(w) state, linear in T.
Training runs the steps as one `lax.scan` (sequential over windows, parallel inside one);
decoding (`cache=`) is token by token with two cached single-token block calls (the H
position attending to P_k and the window so far, then the R position attending to P_{k+1}
so far), O(w) work and a fixed-size state per token, whatever the context length. Both
compute the same function (tests/test_recurrent_transformer.py).

Where linjax differs from the paper's code, and why:
  * zero initial memory (R_{-2} = R_{-1} = 0, no state for window 0) instead of seeding the
    state with the raw embeddings of window 0: every window runs the same update, so a
    document start (or a `segment_ids` boundary) is a plain state reset;
  * the last window is emitted like every other (Block(a * R_{K-1} + H_K)); the paper's
    code drops the a-term there, which makes the last window's output depend on where
    the sequence is cut, so decoding could not equal the full pass;
  * rotary positions 0 .. 2w-1 inside each step instead of learned absolute positions over
    the whole sequence: the block is the same at every window and needs no table of
    length T (O(1) decoding at any length);
  * a Llama block (RMSNorm, SwiGLU, GQA) instead of GPT-2's LayerNorm / ReLU MLP, so the
    FFN can be low-rank / block-structured (`mlp=` as in `LlamaConfig`);
  * a = sigmoid(alpha_logit) (init `alpha_init`, 0.5) instead of clamp(alpha, 0, 1): the
    same range, and the gradient does not vanish at the bounds;
  * packed rows (`segment_ids`): attention and the a-terms never cross a segment boundary,
    so documents do not leak into each other; windows stay aligned to the row, so a document
    that starts mid-row is not computed exactly as it would be alone (decode batches, one
    sequence per row, are).
The curriculum over sequence lengths (the paper's remedy for vanishing gradients) is a
sequence of training stages of increasing `data.seq_len`, each starting from the last one:
experiments/fromscratch_cpu.py (`curriculum`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from linjax.layers.mlp import dense, partitioned
from linjax.layers.norms import RMSNorm

MODEL_TYPE = "linjax_recurrent_transformer"
MIXINGS = ("add", "convex")
ARCHITECTURE = "LinjaxRecurrentTransformer"


class RecurrentTransformerConfigError(ValueError):
  """A recurrent-transformer config field has a bad value."""


@dataclasses.dataclass
class RecurrentTransformerConfig:
  vocab_size: int = 259
  hidden_size: int = 256
  intermediate_size: int = 768
  num_hidden_layers: int = 1          # recurrent layers stacked (the paper: one block)
  num_attention_heads: int = 4
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  window: int = 32                    # w: tokens per window; each step sees 2w positions
  alpha_init: float = 0.5             # initial a = sigmoid(alpha_logit), in (0, 1)
  mixing: str = "add"                 # "add": the paper's a*R + X; "convex": a*R + (1-a)*X
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = True
  initializer_range: float = 0.02
  attention_method: str = "parallel"  # the block's softmax over 2w positions
  mlp: Any = "dense"                  # as LlamaConfig: "dense" | "lowrank" | "block" | ...
  mlp_rank: Any = None
  mlp_blocks: Any = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  bos_token_id: Any = None
  eos_token_id: Any = None
  pad_token_id: Any = None

  def __post_init__(self):
    w = self.window
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
      raise RecurrentTransformerConfigError(
          f"config field 'window' must be an int >= 1 (tokens per window), got {w!r}")
    if not 0.0 < float(self.alpha_init) < 1.0:
      raise RecurrentTransformerConfigError(
          f"config field 'alpha_init' must be in (0, 1) (a = sigmoid(alpha_logit)), got "
          f"{self.alpha_init!r}")
    if self.mixing not in MIXINGS:
      raise RecurrentTransformerConfigError(
          f"config field 'mixing' must be one of {MIXINGS}, got {self.mixing!r}")
    if int(self.num_hidden_layers) < 1:
      raise RecurrentTransformerConfigError(
          f"config field 'num_hidden_layers' must be >= 1, got {self.num_hidden_layers}")
    self.dtype = jnp.dtype(self.dtype).name
    self.param_dtype = jnp.dtype(self.param_dtype).name
    lc = self.llama_config()          # validates heads, FFN fields, method
    self.num_key_value_heads, self.head_dim = lc.num_key_value_heads, lc.head_dim
    self.mlp, self.mlp_rank, self.mlp_blocks = lc.mlp, lc.mlp_rank, lc.mlp_blocks

  def __hash__(self):
    import json
    return hash(json.dumps(self.to_hf(), sort_keys=True, default=str))

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def llama_config(self):
    """The `LlamaConfig` of the block (one "layer" per recurrent layer)."""
    from linjax.models.llama import LlamaConfig
    return LlamaConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
        max_position_embeddings=2 * self.window, rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta, tie_word_embeddings=self.tie_word_embeddings,
        initializer_range=self.initializer_range, mixers="softmax",
        mixer_kwargs={"method": self.attention_method}, mlp=self.mlp,
        mlp_rank=self.mlp_rank, mlp_blocks=self.mlp_blocks, dtype=self.dtype,
        param_dtype=self.param_dtype)

  def replace(self, **kw) -> "RecurrentTransformerConfig":
    return dataclasses.replace(self, **kw)

  def to_hf(self) -> dict:
    """config.json of a linjax checkpoint (`linjax.convert.save_linjax`)."""
    d = dataclasses.asdict(self)
    for k in ("mlp", "mlp_rank", "mlp_blocks"):
      d[k] = list(d[k])
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **d}

  @classmethod
  def from_hf(cls, d: dict, **overrides) -> "RecurrentTransformerConfig":
    d = dict(d)
    if d.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
      raise RecurrentTransformerConfigError(f"not a {MODEL_TYPE} config")
    d.pop("architectures", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise RecurrentTransformerConfigError(f"unknown recurrent-transformer config fields {unknown}")
    d.update(overrides)
    return cls(**d)


# ---------------------------------------------------------------------------------- layers

def _take(mem, idx):
  """mem [B, w, C], idx [B] -> mem[b, idx[b]] [B, C]."""
  return jnp.take_along_axis(mem, idx[:, None, None], axis=1)[:, 0]


class RecurrentLayer(nnx.Module):
  """One recurrent layer: a Llama block stepped over windows (module docstring)."""

  def __init__(self, config: RecurrentTransformerConfig, layer_idx: int, *, rngs: nnx.Rngs):
    from linjax.models.llama import LlamaDecoderLayer
    self.window = int(config.window)
    self.mixing = config.mixing
    self.block = LlamaDecoderLayer(config.llama_config(), layer_idx, rngs=rngs)
    a = float(config.alpha_init)
    self.alpha_logit = nnx.Param(jnp.asarray(math.log(a / (1.0 - a)), jnp.float32),
                                 out_sharding=(), eager_sharding=False)

  def alpha(self):
    return jax.nn.sigmoid(self.alpha_logit[...])

  def mix(self, a, mem, x):
    """a * mem + x ("add", the paper) or a * mem + (1 - a) * x ("convex")."""
    return a * mem + (x if self.mixing == "add" else (1 - a) * x)

  def __call__(self, x, segment_ids=None):
    """Full-sequence form: x [B, T, C] -> [B, T, C]; segment_ids [B, T] (packed documents)."""
    B, T, C = x.shape
    w = self.window
    n = -(-T // w) + 1                       # windows, plus one to emit the last
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pad = n * w - T
    xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(B, n, w, C).swapaxes(0, 1)
    ss = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-2).reshape(B, n, w).swapaxes(0, 1)
    pos = jnp.broadcast_to(jnp.arange(2 * w, dtype=jnp.int32), (B, 2 * w))
    a = self.alpha().astype(x.dtype)
    gdef, state = nnx.split(self.block)

    def body(carry, inp):
      p, p_seg, r_old, r_seg = carry         # P_k (segments of window k-1), R_{k-2}
      wk, sk = inp
      q = self.mix(a, r_old * (r_seg == sk)[..., None].astype(x.dtype), wk)
      z = jnp.concatenate([p, q], axis=1)
      zs = jnp.concatenate([p_seg, sk], axis=1)
      out = nnx.merge(gdef, state)(z, positions=pos, segment_ids=zs)[0]
      r_new, h = out[:, :w], out[:, w:]     # R_{k-1} (window k-1), H_k
      p_next = self.mix(a, r_new * (p_seg == sk)[..., None].astype(x.dtype), h)
      return (p_next, sk, r_new, p_seg), r_new

    zeros = jnp.zeros((B, w, C), x.dtype)
    none = jnp.full((B, w), -1, jnp.int32)
    _, rs = jax.lax.scan(body, (zeros, none, zeros, none), (xs, ss))
    return rs[1:].swapaxes(0, 1).reshape(B, (n - 1) * w, C)[:, :T]

  def init_state(self, batch_size, dtype):
    from linjax.layers.base import init_kv_cache
    attn = self.block.self_attn
    w, C = self.window, attn.hidden_size
    kv = lambda s: init_kv_cache(batch_size, s, attn.num_kv_heads, attn.head_dim, dtype)
    mem = jnp.zeros((batch_size, w, C), dtype)
    return {"mem_a": mem, "mem_b": mem, "mem_cur": mem, "h_cache": kv(2 * w),
            "r_cache": kv(w), "offset": jnp.zeros((batch_size,), jnp.int32)}

  def step(self, x, real, state):
    """One token per row: x [B, C], real [B] bool (False: padding, state unchanged)."""
    w = self.window
    i = state["offset"]
    a = self.alpha().astype(x.dtype)
    seg = real.astype(jnp.int32)[:, None]
    q = self.mix(a, _take(state["mem_a"], i), x)
    h, h_cache = self.block(q[:, None], positions=(w + i)[:, None], segment_ids=seg,
                            cache=state["h_cache"])
    p = self.mix(a, _take(state["mem_b"], i), h[:, 0])
    r, r_cache = self.block(p[:, None], positions=i[:, None], segment_ids=seg,
                            cache=state["r_cache"])
    r = r[:, 0]
    here = (jnp.arange(w)[None, :] == i[:, None]) & real[:, None]
    mem_cur = jnp.where(here[..., None], r[:, None, :].astype(state["mem_cur"].dtype),
                        state["mem_cur"])
    offset = i + real.astype(jnp.int32)
    new = dict(state, mem_cur=mem_cur, h_cache=h_cache, r_cache=r_cache, offset=offset)
    # window complete: R_{j-1} -> mem_a, R_j -> mem_b, the P_{j+1} keys become the context
    empty = self.init_state(x.shape[0], state["mem_cur"].dtype)
    rolled = dict(
        mem_a=state["mem_b"], mem_b=mem_cur, mem_cur=empty["mem_cur"],
        h_cache=jax.tree.map(lambda rc, e: jnp.concatenate([rc, e[:, w:]], axis=1),
                             r_cache, empty["h_cache"]),
        r_cache=empty["r_cache"], offset=jnp.zeros_like(offset))
    done = offset == w
    pick = lambda r_, n_: jnp.where(done.reshape((-1,) + (1,) * (n_.ndim - 1)), r_, n_)
    return r, jax.tree.map(pick, rolled, new)


# ----------------------------------------------------------------------------------- model

class RecurrentTransformer(nnx.Module):
  """Causal LM: embeddings -> recurrent layers -> RMSNorm -> LM head (Llama-style names).
  Saved and loaded like a Llama (`linjax.convert.save_linjax`, `linjax.from_pretrained`)."""

  config_class = RecurrentTransformerConfig

  def __init__(self, config: RecurrentTransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=config.jnp_dtype,
        param_dtype=config.jnp_param_dtype,
        embedding_init=partitioned(nnx.initializers.normal(config.initializer_range),
                                   ("vocab", "embed")), rngs=rngs)
    self.layers = nnx.List([RecurrentLayer(config, i, rngs=rngs)
                            for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=config.jnp_dtype,
                        param_dtype=config.jnp_param_dtype)
    self.lm_head = None if config.tie_word_embeddings else dense(
        config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype=config.jnp_dtype,
        param_dtype=config.jnp_param_dtype, rngs=rngs, std=config.initializer_range)

  def init_cache(self, batch_size: int, max_len: int | None = None, dtype=None):
    """Decode state, the same size for any context length (`max_len` is not needed)."""
    del max_len
    dtype = dtype or self.config.jnp_dtype
    return {"layers": [l.init_state(batch_size, dtype) for l in self.layers],
            "next_pos": jnp.zeros((batch_size,), jnp.int32)}

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None,
               last_only: bool = False):
    """tokens [B, T] -> (logits [B, T, vocab] float32, cache); last_only: the last
    position's alone ([B, 1, vocab], as `linjax.Llama`).

    Without a cache: the full-sequence form (segment_ids: packed documents; positions are
    not used: the block's positions are window-relative). With a cache: T new tokens, one
    at a time (segment_ids 1 = token, 0 = padding, as in decode batches)."""
    B, T = tokens.shape
    x = self.embed_tokens(tokens)
    if cache is None:
      for layer in self.layers:
        x = layer(x, segment_ids)
    else:
      real = jnp.ones((B, T), bool) if segment_ids is None else segment_ids > 0

      def body(states, inp):
        xt, rt = inp
        new = []
        for layer, st in zip(self.layers, states):
          xt, st = layer.step(xt, rt, st)
          new.append(st)
        return new, xt

      states, ys = jax.lax.scan(body, cache["layers"], (x.swapaxes(0, 1), real.T))
      x = ys.swapaxes(0, 1)
      if positions is None:
        positions = cache["next_pos"][:, None] + jnp.cumsum(real, axis=1) - 1
      last = jnp.max(jnp.where(real, positions, -1), axis=1)
      cache = {"layers": states, "next_pos": jnp.maximum(cache["next_pos"], last + 1)}
    x = self.norm(x[:, -1:] if last_only else x)
    logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits.astype(jnp.float32), cache
