"""FFN compression of a pretrained Llama: dense gate / up / down -> structured, and back.

    small, report = linjax.compress_ffn(model, rank_fraction=0.25)          # every layer
    small, report = linjax.compress_ffn(model, rank=64, layers=range(10, 30))
    small, report = linjax.compress_ffn(model, rank_fraction=0.25, allocate="error")
    small, report = linjax.compress_ffn(model, kind="block", blocks=4)
    small, report = linjax.compress_ffn(model, rank_fraction=0.5, calibration=train_tokens)
    dense = linjax.merge_ffn(small)                                          # exact

`compress_ffn` returns a new model (the input is untouched) whose chosen layers have
`mlp="lowrank"` (truncated SVD of each of gate / up / down, sqrt(S) on each factor: the best
rank-r approximation in Frobenius norm) or `mlp="block"` (the Frobenius-optimal BlockShuffle
projection, `structured_mlp.block_shuffle_project`), and a report: per layer the rank (or
blocks) and the relative reconstruction error ||W - W_r||_F / ||W||_F of each projection,
with FFN and total parameter counts before and after.

With `calibration` (training-split token rows [rows, T], never held-out text) the low-rank
truncation is activation-aware: each projection W keeps the rank-r W_r that minimises the
error of its *outputs* on the activations it sees, E ||x (W - W_r)||^2 over the calibration
tokens (x: the FFN input for gate / up, silu(gate x) * up x of the dense FFN for down), not
||W - W_r||_F. With C = E[x^T x] + lambda I = S S^T (Cholesky; lambda = `damping` times the
mean of diag C keeps C positive definite), that is the truncated SVD of S^T W mapped back by
S^-T (Eckart-Young in the whitened space; the "SVD-LLM" construction, Wang et al. 2024). The
default damping 1e-3 was the best of 1e-1 / 1e-2 / 1e-3 at rank 1/2 of SmolLM2-135M on its
validation split (the three are close). The report's errors are then the relative output
errors sqrt(E||x (W - W_r)||^2 / E||x W||^2) (with the damping term), and `allocate="error"`
spends the rank where the outputs need it. Plain SVD spends rank on directions the
activations never excite: with every FFN of SmolLM2-135M at rank 1/2, the held-out perplexity
ratio to the dense model is 2.78 with calibration and 23,846 without before any training, and
1.53 vs 67.7 after the same 240 s of distillation (experiments/results/ffn_compress_smollm2.md).

allocate="error" keeps the total rank of the uniform choice (`rank` / `rank_fraction` times
the number of layers) but gives it to the layers by reconstruction error: greedily, in steps
of `rank_step`, to the layer whose next singular values carry the largest share of its
matrices' energy (sum over gate / up / down of sigma_k^2 / ||W||_F^2). Since singular values
only decrease, the greedy choice minimises the sum over layers of the squared relative
errors for that budget.

The function is recovered afterwards by distillation from the dense teacher with the
training loop (experiments/ffn_compress_smollm2.py). `merge_ffn` multiplies the factors out
(the paper's "pre-merge" for small decode batches, and the way to export to transformers'
`LlamaForCausalLM`).
"""
from __future__ import annotations

import heapq
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linjax.layers import structured_mlp as sm
from linjax.layers.params import param_count

PROJS = ("gate_proj", "up_proj", "down_proj")


def _flat(model) -> dict:
  return dict(nnx.to_flat_state(nnx.state(model)))


def _value(var):
  return var.get_value() if hasattr(var, "get_value") else var.value


def _rebuild(model, config, new_params: dict):
  """A new Llama of `config`: every variable copied by path from `model`, except those in
  `new_params` (path -> array)."""
  from linjax.models.llama import Llama
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  flat = dict(nnx.to_flat_state(abstract))
  old = _flat(model)
  for path, var in flat.items():
    if path in new_params:
      x = new_params[path]
    elif path in old and tuple(old[path].shape) == tuple(var.shape):
      x = _value(old[path])
    else:
      raise ValueError(f"internal: no value for {'/'.join(map(str, path))} in the rebuilt model")
    if tuple(np.shape(x)) != tuple(var.shape):
      raise ValueError(f"internal: {'/'.join(map(str, path))} has shape {np.shape(x)}, the "
                       f"model wants {tuple(var.shape)}")
    var.set_value(jnp.asarray(x, var.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_model(model):
  from linjax.layers.lora import lora_modules
  from linjax.models.llama import Llama
  if not isinstance(model, Llama):
    raise TypeError(f"expected a linjax Llama, got {type(model).__name__}")
  if lora_modules(model):
    raise ValueError("the model carries LoRA adapters: fold them in first "
                     "(linjax.layers.lora.merge_lora(model))")


def _layer_ids(layers, n):
  if layers is None:
    return list(range(n))
  ids = sorted({int(i) for i in layers})
  bad = [i for i in ids if not 0 <= i < n]
  if bad:
    raise ValueError(f"compress_ffn: layers {bad} out of range for {n} layers")
  if not ids:
    raise ValueError("compress_ffn: `layers` is empty")
  return ids


def _per_layer_arg(value, ids, name):
  """value (one, a sequence over `ids`, or a {layer: value} dict) -> {layer: value}."""
  if isinstance(value, dict):
    missing = [i for i in ids if i not in value]
    if missing:
      raise ValueError(f"compress_ffn: `{name}` has no entry for layers {missing}")
    return {i: value[i] for i in ids}
  if isinstance(value, (list, tuple)):
    if len(value) != len(ids):
      raise ValueError(f"compress_ffn: `{name}` has {len(value)} entries for {len(ids)} layers")
    return dict(zip(ids, value))
  return {i: value for i in ids}


def _dense_weights(model, i):
  mlp = model.layers[i].mlp
  out = {}
  for p in PROJS:
    lin = getattr(mlp, p)
    out[p] = np.asarray(jax.device_get(lin.kernel[...]), np.float64)
    b = getattr(lin, "bias", None)
    out[p + ".bias"] = None if b is None else np.asarray(jax.device_get(b[...]))
  return out


def allocate_ranks(energies: dict, budget: int, *, step: int = 8, max_rank: int) -> dict:
  """Greedy rank allocation: energies {layer: [E_k]} with E_k the share of the layer's
  energy carried by singular value k (non-increasing in k); returns {layer: rank} with the
  ranks summing to `budget`, each in [min(step, budget // layers), max_rank]."""
  n = len(energies)
  if budget > n * max_rank:
    raise ValueError(f"a total rank of {budget} exceeds {n} layers x {max_rank}")
  base = max(1, min(step, budget // n))
  ranks = {i: base for i in energies}
  left = budget - base * n
  cum = {i: np.concatenate([[0.0], np.cumsum(e)]) for i, e in energies.items()}

  def gain(i, k):
    lo, hi = ranks[i], min(ranks[i] + k, max_rank)
    return float(cum[i][hi] - cum[i][lo])

  for k in (step, 1):
    heap = [(-gain(i, k), i) for i in ranks if ranks[i] + k <= max_rank]
    heapq.heapify(heap)
    while left >= k and heap:
      _, i = heapq.heappop(heap)
      ranks[i] += k
      left -= k
      if ranks[i] + k <= max_rank:
        heapq.heappush(heap, (-gain(i, k), i))
  return ranks


def ffn_moments(model, tokens, layers=None, *, batch_size: int = 4) -> dict:
  """{layer: (C_in [h, h], C_mid [m, m])}: the second moments E[x^T x] over every position of
  `tokens` [rows, T] of what the layer's FFN projections see, from a teacher-forced pass of
  `model` itself: x = post_attention_layernorm output (gate / up) and silu(gate x) * up x
  (down). float64."""
  from linjax.layers.mlp import ACTIVATIONS
  tokens = np.asarray(tokens)
  cfg = model.config
  if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError("compress_ffn: `calibration` must be integer token ids [rows, T] with at "
                     f"least one token, got {tokens.dtype} {tokens.shape}")
  if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
    raise ValueError(f"compress_ffn: `calibration` holds token ids outside [0, "
                     f"{cfg.vocab_size}) (min {tokens.min()}, max {tokens.max()})")
  ids = _layer_ids(layers, cfg.num_hidden_layers)
  h, m = cfg.hidden_size, cfg.intermediate_size

  @nnx.jit
  def moments(model, tok):
    pos = jnp.broadcast_to(jnp.arange(tok.shape[1], dtype=jnp.int32), tok.shape)
    hs = model.hidden_states(tok, positions=pos)
    out = []
    for i in ids:
      layer = model.layers[i]
      x = layer.post_attention_layernorm(hs["layer_inputs"][i] + hs["mixer_outputs"][i])
      mlp = layer.mlp
      mid = ACTIVATIONS[mlp.act](mlp.gate_proj(x)) * mlp.up_proj(x)
      x, mid = x.reshape(-1, h).astype(jnp.float32), mid.reshape(-1, m).astype(jnp.float32)
      hi = jax.lax.Precision.HIGHEST
      out.append((jnp.matmul(x.T, x, precision=hi), jnp.matmul(mid.T, mid, precision=hi)))
    return out

  acc = {i: [np.zeros((h, h)), np.zeros((m, m))] for i in ids}
  for s in range(0, tokens.shape[0], batch_size):
    for i, (a, b) in zip(ids, jax.device_get(moments(model, jnp.asarray(tokens[s:s + batch_size])))):
      acc[i][0] += a
      acc[i][1] += b
  return {i: (a / tokens.size, b / tokens.size) for i, (a, b) in acc.items()}


def _whitener(c, damping: float):
  """S with S S^T = c + damping * mean(diag c) * I (lower Cholesky factor)."""
  c = np.asarray(c, np.float64)
  lam = float(damping) * float(np.mean(np.diag(c)))
  try:
    return np.linalg.cholesky(c + lam * np.eye(c.shape[0]))
  except np.linalg.LinAlgError:
    raise ValueError(f"compress_ffn: the calibration activations' second moment is singular "
                     f"(damping={damping}); give more calibration tokens or a larger "
                     "`damping`") from None


def _truncate(usv, r, st=None):
  """(V, U, relative tail error) of rank r from the SVD (u, s, vh) of M = st W (st = S^T, or
  None for M = W): V = st^-1 u_r sqrt(s_r), U = sqrt(s_r) vh_r."""
  a, s, bh = usv
  root = np.sqrt(s[:r])
  v = a[:, :r] * root
  if st is not None:
    v = np.linalg.solve(st, v)
  return v, root[:, None] * bh[:r], math.sqrt(float(np.sum(s[r:] ** 2) / np.sum(s ** 2)))


def compress_ffn(model, *, rank=None, rank_fraction=None, kind: str = "lowrank", blocks=None,
                 layers=None, allocate: str = "uniform", rank_step: int = 8,
                 calibration=None, damping: float = 1e-3):
  """See the module docstring. Returns (new_model, report)."""
  _check_model(model)
  cfg = model.config
  h, m, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  ids = _layer_ids(layers, n)
  if kind not in ("lowrank", "block"):
    if kind == "blockdense":
      raise ValueError("compress_ffn: kind='blockdense' has no closed-form projection from a "
                       "dense matrix (block-diagonal times dense is not separable); train it "
                       "from scratch (LlamaConfig(mlp='blockdense')) or use 'lowrank' / 'block'")
    raise ValueError(f"compress_ffn: `kind` must be 'lowrank' or 'block', got {kind!r}")
  if allocate not in ("uniform", "error"):
    raise ValueError(f"compress_ffn: `allocate` must be 'uniform' or 'error', got {allocate!r}")
  already = [i for i in ids if cfg.mlp[i] != "dense"]
  if already:
    raise ValueError(f"compress_ffn: layers {already} are already structured "
                     f"(mlp={cfg.mlp[already[0]]!r}); linjax.merge_ffn(model) first")
  kinds, ranks, nblocks = list(cfg.mlp), list(cfg.mlp_rank), list(cfg.mlp_blocks)
  if kind == "lowrank":
    if (rank is None) == (rank_fraction is None):
      raise ValueError("compress_ffn(kind='lowrank') takes exactly one of `rank` and "
                       "`rank_fraction`")
    if blocks is not None:
      raise ValueError("compress_ffn: `blocks` is for kind='block'")
    name = "rank" if rank is not None else "rank_fraction"
    given = _per_layer_arg(rank if rank is not None else rank_fraction, ids, name)
    if rank_fraction is not None:
      for i, f in given.items():
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
          raise ValueError(f"compress_ffn: `rank_fraction` must be in (0, 1], got {f!r} "
                           f"(layer {i})")
      given = {i: float(f) for i, f in given.items()}
    else:
      for i, r in given.items():
        if not isinstance(r, (int, np.integer)) or isinstance(r, bool):
          raise ValueError(f"compress_ffn: `rank` must be an int, got {r!r} (layer {i})")
    want = {i: sm.resolve_rank(v, h, m, field=f"'{name}' (compress_ffn, layer {i})")
            for i, v in given.items()}
  else:
    if rank is not None or rank_fraction is not None or allocate != "uniform":
      raise ValueError("compress_ffn(kind='block') takes `blocks` only (no rank / allocate)")
    if blocks is None:
      raise ValueError("compress_ffn(kind='block') needs `blocks`")
    want = {i: sm.check_blocks(b, (h, m), field=f"'blocks' (compress_ffn, layer {i})")
            for i, b in _per_layer_arg(blocks, ids, "blocks").items()}

  if calibration is not None and kind != "lowrank":
    raise ValueError("compress_ffn: `calibration` (activation-aware truncation) is for "
                     "kind='lowrank'; BlockShuffle's projection is in weight space")
  if not (isinstance(damping, (int, float)) and damping >= 0):
    raise ValueError(f"compress_ffn: `damping` must be a number >= 0, got {damping!r}")

  weights = {i: _dense_weights(model, i) for i in ids}
  fits = {}                                              # (layer, proj) -> (V, U, rel. error)
  if kind == "lowrank":
    svd, unwhiten = {}, {}
    moments = ffn_moments(model, calibration, ids) if calibration is not None else None
    for i in ids:
      svd[i], unwhiten[i] = {}, {}
      for p in PROJS:
        st = None
        if moments is not None:                          # Eckart-Young in the whitened space
          st = _whitener(moments[i][1 if p == "down_proj" else 0], damping).T
        svd[i][p] = sm.svd(weights[i][p] if st is None else st @ weights[i][p])
        unwhiten[i][p] = st
    if allocate == "error":
      energies = {i: sum(s ** 2 / np.sum(s ** 2) for _, s, _ in svd[i].values()) for i in ids}
      want = allocate_ranks(energies, sum(want.values()), step=int(rank_step),
                            max_rank=min(h, m))
    fits = {(i, p): _truncate(svd[i][p], want[i], unwhiten[i][p]) for i in ids for p in PROJS}

  new_params, rows = {}, []
  for i in ids:
    row = {"layer": i, "kind": kind, "rel_error": {}}
    for p in PROJS:
      w = weights[i][p]
      base = ("layers", i, "mlp", p)
      if kind == "lowrank":
        v, u, row["rel_error"][p] = fits[(i, p)]
        new_params[base + ("v", "kernel")] = v
        new_params[base + ("u", "kernel")] = u
        bias_path = base + ("u", "bias")
      else:
        v, u, err = sm.block_shuffle_project(w, want[i])
        new_params[base + ("v", "kernel")] = v
        new_params[base + ("u", "kernel")] = u
        row["rel_error"][p] = err
        bias_path = base + ("bias",)
      if weights[i][p + ".bias"] is not None:
        new_params[bias_path] = weights[i][p + ".bias"]
    kinds[i] = kind
    if kind == "lowrank":
      ranks[i] = row["rank"] = int(want[i])
    else:
      nblocks[i] = row["blocks"] = int(want[i])
    row["params"] = sm.mlp_param_count(kind, h, m, rank=ranks[i], blocks=nblocks[i])
    row["dense_params"] = sm.mlp_param_count("dense", h, m)
    rows.append(row)
  new_cfg = cfg.replace(mlp=tuple(kinds), mlp_rank=tuple(ranks), mlp_blocks=tuple(nblocks))
  small = _rebuild(model, new_cfg, new_params)
  report = {
      "kind": kind, "allocate": allocate, "layers": rows,
      "error": "weights" if calibration is None else "calibration outputs",
      "calibration_tokens": 0 if calibration is None else int(np.asarray(calibration).size),
      "damping": None if calibration is None else float(damping),
      "mean_rel_error": float(np.mean([e for r in rows for e in r["rel_error"].values()])),
      "ffn_params_before": ffn_params(model), "ffn_params_after": ffn_params(small),
      "params_before": param_count(model), "params_after": param_count(small),
  }
  return small, report


def merge_ffn(model, layers=None):
  """A new model whose structured FFNs (all, or `layers`) are dense again, W = the product
  of the factors (exact up to float32 rounding)."""
  _check_model(model)
  cfg = model.config
  ids = [i for i in _layer_ids(layers, cfg.num_hidden_layers) if cfg.mlp[i] != "dense"]
  kinds, ranks, nblocks = list(cfg.mlp), list(cfg.mlp_rank), list(cfg.mlp_blocks)
  new_params = {}
  for i in ids:
    mlp = model.layers[i].mlp
    for p in PROJS:
      lin = getattr(mlp, p)
      new_params[("layers", i, "mlp", p, "kernel")] = np.asarray(jax.device_get(lin.to_dense()))
      bias = getattr(lin, "bias", None)
      if bias is None and isinstance(getattr(lin, "u", None), nnx.Linear):
        bias = lin.u.bias
      if bias is not None:
        new_params[("layers", i, "mlp", p, "bias")] = np.asarray(jax.device_get(bias[...]))
    kinds[i], ranks[i], nblocks[i] = "dense", None, None
  return _rebuild(model, cfg.replace(mlp=tuple(kinds), mlp_rank=tuple(ranks),
                                     mlp_blocks=tuple(nblocks)), new_params)


def ffn_params(model) -> int:
  """Parameters of every layer's FFN (weights and biases)."""
  return sum(param_count(layer.mlp) for layer in model.layers)
