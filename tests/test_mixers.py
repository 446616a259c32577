"""Linear and hybrid mixers: the methods agree, prefill + decode equals one full pass,
padding and packed segments are exact, and a Llama built from them decodes like it runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linjax.layers.mixers import get_mixer
from linjax.layers.params import FeatureMapParam
from linjax.models.llama import Llama, LlamaConfig
from tests.helpers import assert_rel

# name, kwargs, tolerance between modes (f32)
MIXERS = [
    ("linear", dict(feature_map="hedgehog"), 1e-4),
    ("linear", dict(feature_map="elu", normalize=None), 1e-4),
    ("linear", dict(feature_map="dpfp", tie_qk=True), 1e-4),
    ("linear", dict(feature_map="t2r", decay="retnet", normalize="groupnorm"), 1e-4),
    ("retention", {}, 1e-4),
    ("lightning", {}, 1e-4),
    ("gla", {}, 1e-4),
    ("deltanet", {}, 1e-4),
    ("deltanet", dict(allow_neg_eigval=True), 1e-4),
    ("gated_deltanet", {}, 1e-4),
    ("supra", {}, 1e-4),
    ("lolcats", dict(window=8, variant="sw"), 1e-4),
    ("lolcats", dict(window=8, variant="tk"), 1e-4),
    ("liger", dict(window=8), 1e-4),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw, _ in MIXERS]
# Decode and padding tests: a representative subset by default (one per recurrence family and
# every hybrid), the rest under `make test-slow` (CPU budget of the default run).
FAST = {"linear-feature_map=hedgehog", "gla-", "gated_deltanet-", "supra-",
        "lolcats-window=8-variant=sw", "lolcats-window=8-variant=tk", "liger-window=8"}
SUBSET = [pytest.param(*m, id=i, marks=() if i in FAST else pytest.mark.slow)
          for m, i in zip(MIXERS, IDS)]


def tiny_config(**kw):
  base = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=3, num_key_value_heads=1, head_dim=16,
              max_position_embeddings=256, rope_theta=1000.0)
  base.update(kw)
  return LlamaConfig(**base)


def perturb(module, seed=0, scale=0.1):
  """Move every FeatureMapParam off its (identity) init so the test sees real maps."""
  state = nnx.state(module, FeatureMapParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(module, jax.tree.unflatten(tree, leaves))


def make_mixer(name, kw, method="chunk", seed=0):
  cfg = tiny_config()
  m = get_mixer(name)(cfg, 0, rngs=nnx.Rngs(seed), method=method, **kw)
  perturb(m, seed)
  return m


@nnx.jit
def run(m, x, pos, seg=None, cache=None):
  return m(x, positions=pos, segment_ids=seg, cache=cache)


def inputs(B=2, T=37, seed=1):
  x = jax.random.normal(jax.random.PRNGKey(seed), (B, T, 48))
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return x, pos


@pytest.mark.parametrize("name,kw,tol", MIXERS, ids=IDS)
def test_methods_agree(name, kw, tol):
  m = make_mixer(name, kw)
  x, pos = inputs()
  outs = {}
  for method in ("parallel", "chunk", "recurrent"):
    m.method = method
    outs[method], c = run(m, x, pos)
    assert c is None
  assert_rel(outs["recurrent"], outs["parallel"], tol, f"{name} parallel vs recurrent")
  assert_rel(outs["recurrent"], outs["chunk"], tol, f"{name} chunk vs recurrent")


@pytest.mark.parametrize("name,kw,tol", SUBSET)
def test_prefill_then_decode(name, kw, tol):
  m = make_mixer(name, kw)
  x, pos = inputs(T=30)
  full, _ = run(m, x, pos)
  cache = m.init_cache(2, 64)
  y1, cache = run(m, x[:, :19], pos[:, :19], None, cache)
  ys = [y1]
  for t in range(19, 30):
    y, cache = run(m, x[:, t:t + 1], pos[:, t:t + 1], None, cache)
    ys.append(y)
  assert_rel(full, jnp.concatenate(ys, 1), tol, f"{name} prefill+decode vs full")


@pytest.mark.parametrize("name,kw,tol", SUBSET)
def test_left_padding_and_segments(name, kw, tol):
  m = make_mixer(name, kw)
  x, pos = inputs(B=1, T=21)
  ref, _ = run(m, x, pos)
  # decode batch: row 1 is the same sequence left-padded by 5 garbage tokens (segment 0)
  pad = jax.random.normal(jax.random.PRNGKey(7), (1, 5, 48))
  xb = jnp.concatenate([jnp.concatenate([x, jnp.zeros((1, 5, 48))], 1),
                        jnp.concatenate([pad, x], 1)], 0)
  posb = jnp.stack([jnp.arange(26), jnp.concatenate([jnp.zeros(5, int), jnp.arange(21)])]).astype(jnp.int32)
  segb = jnp.stack([jnp.concatenate([jnp.ones(21, int), jnp.zeros(5, int)]),
                    jnp.concatenate([jnp.zeros(5, int), jnp.ones(21, int)])]).astype(jnp.int32)
  cache = m.init_cache(2, 64)
  y, cache = run(m, xb, posb, segb, cache)
  assert_rel(ref[0], y[0, :21], tol, f"{name} right-padded row")
  assert_rel(ref[0], y[1, 5:], tol, f"{name} left-padded row")
  # packed documents in a full pass == separate passes
  x2, _ = inputs(B=1, T=13, seed=3)
  ref2, _ = run(m, x2, pos[:, :13])
  xp = jnp.concatenate([x, x2], 1)
  pp = jnp.concatenate([pos, pos[:, :13]], 1)
  sp = jnp.concatenate([jnp.ones((1, 21), jnp.int32), 2 * jnp.ones((1, 13), jnp.int32)], 1)
  for method in ("parallel", "chunk"):
    m.method = method
    yp, _ = run(m, xp, pp, sp)
    assert_rel(ref, yp[:, :21], tol, f"{name} packed doc 1 ({method})")
    assert_rel(ref2, yp[:, 21:], tol, f"{name} packed doc 2 ({method})")


@pytest.mark.parametrize("name,kw", [("lolcats", dict(window=8)), ("deltanet", {})])
def test_llama_with_mixers_decodes_like_full_pass(name, kw):
  cfg = tiny_config(mixers=("softmax", name), mixer_kwargs=[{}, kw])
  model = Llama(cfg, rngs=nnx.Rngs(0))
  perturb(model)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 0, 97)
  fwd = nnx.jit(lambda m, t, c: m(t, cache=c))
  full, _ = fwd(model, tokens, None)
  cache = model.init_cache(2, 32)
  l1, cache = fwd(model, tokens[:, :16], cache)
  outs = [l1]
  for t in range(16, 24):
    lt, cache = fwd(model, tokens[:, t:t + 1], cache)
    outs.append(lt)
  assert_rel(full, jnp.concatenate(outs, 1), 1e-4, f"llama[{name}] decode")


def test_distill_mode_returns_teacher_and_sows_loss():
  cfg = tiny_config()
  m = get_mixer("lolcats")(cfg, 0, rngs=nnx.Rngs(0), window=8)
  sm = get_mixer("softmax")(cfg, 0, rngs=nnx.Rngs(0))
  x, pos = inputs()
  teacher, _ = sm(x, positions=pos)
  m.distill = "mse"
  y, _ = m(x, positions=pos)
  assert_rel(teacher, y, 1e-5, "distill output is the teacher's")
  inter = nnx.pop(m, nnx.Intermediate)
  (loss,) = jax.tree.leaves(inter)
  assert np.isfinite(float(loss)) and float(loss) > 0


# ReLU-kinked maps (DPFP, T2R) are left out: a finite difference of a few thousand ReLU
# pre-activations crosses kinks at any step size that f32 resolves.
# All under `make test-slow`: the per-leaf test below checks every leaf (and the input) on
# its own in the default run, which this one random direction over all of them implies.
FD_CASES = [pytest.param(m[0], m[1], method, id=f"{i}-{method}", marks=pytest.mark.slow)
            for m, i in zip(MIXERS, IDS) if "dpfp" not in i and "t2r" not in i
            for method in ("parallel", "chunk")]


@pytest.mark.parametrize("name,kw,method", FD_CASES)
def test_gradients_match_finite_differences(name, kw, method):
  """d loss along a random direction of (input, every parameter): autodiff vs a central
  finite difference of the forward itself. Catches gradients that disagree with the forward
  (a detached max in LoLCATs' shared denominator once flipped the sign of the q/k gradient
  and made LoRA fine-tunes diverge); the mode-agreement tests cannot see that."""
  m = make_mixer(name, kw, method=method)
  x, pos = inputs(B=1, T=21)
  w = jax.random.normal(jax.random.PRNGKey(5), (1, 21, 48))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(p, x):
    y, _ = nnx.merge(graphdef, p, rest)(x, positions=pos)
    return (y * w).sum()

  kx, kp = jax.random.split(jax.random.PRNGKey(6))
  dx = jax.random.normal(kx, x.shape)
  leaves, tree = jax.tree.flatten(params)
  # each parameter moves in proportion to its own size (gate biases and norm scales too)
  dp = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype) *
                                 (jnp.sqrt((a ** 2).mean()) + 0.05)
                                 for a, k in zip(leaves, jax.random.split(kp, len(leaves)))])
  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  auto = float((gx * dx).sum()) + sum(float((a * b).sum()) for a, b in
                                      zip(jax.tree.leaves(gp), jax.tree.leaves(dp)))
  f = jax.jit(loss)
  eps = 1e-3
  shift = lambda s: (jax.tree.map(lambda a, d: a + s * d, params, dp), x + s * dx)
  fd = (float(f(*shift(eps))) - float(f(*shift(-eps)))) / (2 * eps)
  assert abs(auto - fd) <= 1e-2 * max(abs(fd), 0.1), (name, method, auto, fd)


def _scan_lengths(jaxpr):
  """Lengths of every lax.scan in a (closed) jaxpr, nested ones included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      out.append(eqn.params["length"])
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          out += _scan_lengths(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          out += _scan_lengths(sub)
  return out


PREFILL = [pytest.param(*m, id=i) for m, i in zip(MIXERS, IDS)] + [
    pytest.param("softmax", {}, 1e-4, id="softmax"),
    pytest.param("sliding_window", dict(window=8, num_sinks=2), 1e-4, id="sliding_window"),
    pytest.param("lolcats", dict(window=8, num_sinks=2), 1e-4, id="lolcats-sinks"),
    pytest.param("liger", dict(window=8, num_sinks=2), 1e-4, id="liger-sinks")]


@pytest.mark.parametrize("name,kw,tol", PREFILL)
def test_chunked_prefill_then_decode_equals_token_by_token(name, kw, tol):
  """Two prompts of different lengths, left-padded into one batch: a prefill in two chunks
  (the first with the padding) then decode steps give, for each row, the outputs of feeding
  that row's tokens one at a time; and a prefill runs the chunk forms, never a per-token scan."""
  m = make_mixer(name, kw, method="chunk")
  lens, extra, steps = (23, 14), 9, 4
  L = max(lens)
  x_all = jax.random.normal(jax.random.PRNGKey(11), (2, L + extra + steps, 48))
  # row b: its lens[b] prompt tokens end at column L (left padding before them)
  pos = np.zeros((2, L), np.int32)
  seg = np.zeros((2, L), np.int32)
  for b, n in enumerate(lens):
    pos[b, L - n:] = np.arange(n)
    seg[b, L - n:] = 1
  cache = m.init_cache(2, 64)
  y1, cache = run(m, x_all[:, :L], jnp.asarray(pos), jnp.asarray(seg), cache)
  pos2 = jnp.asarray(np.stack([np.arange(n, n + extra) for n in lens]).astype(np.int32))
  y2, cache = run(m, x_all[:, L:L + extra], pos2, None, cache)
  ys = [y2]
  for t in range(steps):
    p = pos2[:, -1:] + 1 + t
    y, cache = run(m, x_all[:, L + extra + t:L + extra + t + 1], p, None, cache)
    ys.append(y)
  got = jnp.concatenate(ys, 1)
  for b, n in enumerate(lens):
    c = m.init_cache(1, 64)
    ref = []
    xs = jnp.concatenate([x_all[b:b + 1, L - n:L], x_all[b:b + 1, L:]], 1)
    for t in range(xs.shape[1]):
      y, c = run(m, xs[:, t:t + 1], jnp.full((1, 1), t, jnp.int32), None, c)
      ref.append(y)
    ref = jnp.concatenate(ref, 1)
    assert_rel(ref[:, :n], y1[b:b + 1, L - n:], tol, f"{name} row {b} prefill chunk 1")
    assert_rel(ref[:, n:], got[b:b + 1], tol, f"{name} row {b} prefill chunk 2 + decode")
  # the prefill is one pass of the chunk forms: no scan runs over its tokens one by one
  jaxpr = jax.make_jaxpr(lambda x, p, s, c: m(x, positions=p, segment_ids=s, cache=c))(
      x_all[:, :L], jnp.asarray(pos), jnp.asarray(seg), m.init_cache(2, 64))
  assert all(n < L for n in _scan_lengths(jaxpr.jaxpr)), _scan_lengths(jaxpr.jaxpr)


@pytest.mark.parametrize("variant", ["sw", "tk"])
def test_lolcats_recurrent_prefill_is_token_by_token(variant):
  """LoLCATs' method="recurrent" prefill (the benchmarks' token-by-token baseline) scans the
  decode step over the prompt: a lax.scan of the prompt's length, and the same outputs and
  decode state as the chunk prefill, over a left-padded batch, then one decode step alike."""
  m = make_mixer("lolcats", dict(window=8, num_sinks=2, variant=variant), method="chunk")
  L = 21
  x = jax.random.normal(jax.random.PRNGKey(5), (2, L + 1, 48))
  pos = np.zeros((2, L), np.int32)
  seg = np.zeros((2, L), np.int32)
  for b, n in enumerate((21, 12)):
    pos[b, L - n:], seg[b, L - n:] = np.arange(n), 1
  pos, seg = jnp.asarray(pos), jnp.asarray(seg)
  nxt = pos[:, -1:] + 1
  out = {}
  for method in ("chunk", "recurrent"):
    m.method = method
    y, c = run(m, x[:, :L], pos, seg, m.init_cache(2, 64))
    yd, _ = run(m, x[:, L:], nxt, None, c)
    out[method] = (y, c, yd)
  (y0, c0, d0), (y1, c1, d1) = out["chunk"], out["recurrent"]
  keep = np.asarray(seg)[:, :, None] > 0                  # padded positions' outputs are unused
  assert_rel(jnp.where(keep, y0, 0.0), jnp.where(keep, y1, 0.0), 1e-4, "prefill outputs")
  assert_rel(c0["state"], c1["state"], 1e-4, "linear state")
  assert_rel(d0, d1, 1e-4, "decode step after the prefill")
  jaxpr = jax.make_jaxpr(lambda x, p, s, c: m(x, positions=p, segment_ids=s, cache=c))(
      x[:, :L], pos, seg, m.init_cache(2, 64))
  assert L in _scan_lengths(jaxpr.jaxpr), _scan_lengths(jaxpr.jaxpr)


PALLAS_FAST = {"linear-feature_map=hedgehog", "gla-", "gated_deltanet-",
               "lolcats-window=8-variant=sw", "liger-window=8"}
PALLAS = [pytest.param(*m[:2], id=i, marks=() if i in PALLAS_FAST else pytest.mark.slow)
          for m, i in zip(MIXERS, IDS)]


@pytest.mark.parametrize("name,kw", PALLAS)
def test_pallas_method_matches_chunk_in_a_llama(name, kw):
  """A tiny Llama with the mixer in layer 0: method="pallas" (the Pallas kernels, interpret
  mode on CPU) gives the logits and every parameter gradient of method="chunk", on packed
  rows (two documents, positions restarting) and a plain row."""
  from linjax.linearize import set_method
  cfg = tiny_config(mixers=(name, "softmax"), mixer_kwargs=[kw, {}])
  model = Llama(cfg, rngs=nnx.Rngs(0))
  perturb(model)
  B, T = 2, 32
  toks = jax.random.randint(jax.random.PRNGKey(3), (B, T), 0, 97)
  seg = jnp.asarray(np.stack([np.r_[np.ones(13), 2 * np.ones(19)], np.ones(32)]).astype(np.int32))
  pos = jnp.asarray(np.stack([np.r_[np.arange(13), np.arange(19)], np.arange(32)]).astype(np.int32))

  def loss_and_grads(method):
    m = set_method(nnx.clone(model), method)
    gdef, params, rest = nnx.split(m, nnx.Param, ...)

    def f(p):
      logits, _ = nnx.merge(gdef, p, rest)(toks, positions=pos, segment_ids=seg)
      return (logits * jnp.sin(jnp.arange(97.0))).sum(), logits
    (_, logits), g = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return logits, g

  lc, gc = loss_and_grads("chunk")
  lp, gp = loss_and_grads("pallas")
  assert_rel(lc, lp, 1e-5, f"{name} logits pallas vs chunk")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gc)[0], jax.tree.leaves(gp)):
    assert_rel(a, b, 1e-4, f"{name} grad {jax.tree_util.keystr(path)}")


# Every parameter leaf on its own: a random direction per leaf (and one for the input), the
# autodiff directional derivative against a central finite difference of the forward along
# that leaf alone, so a zeroed or sign-flipped gradient of any single leaf fails. Projections
# are drawn large enough that attention is far from uniform, GLA's gate bias starts at 0 (at
# its init of 4 the gates are saturated and their gradient is below the f32 noise of a
# finite difference), and T = 21 gives tk LoLCATs a linear block. The ReLU-kinked maps are in:
# at this step (1e-3 of each leaf's scale) too few pre-activations cross a kink to matter.
LEAF_FD = [pytest.param(*m[:2], "chunk", id=f"{i}-chunk") for m, i in zip(MIXERS, IDS)] + [
    pytest.param("lolcats", dict(window=8, variant="sw"), "parallel", id="lolcats-sw-parallel"),
    pytest.param("lolcats", dict(window=8, variant="tk"), "parallel", id="lolcats-tk-parallel")]


@pytest.mark.parametrize("name,kw,method", LEAF_FD)
def test_every_parameter_leaf_gradient_matches_finite_differences(name, kw, method):
  m = make_mixer(name, kw, method=method)
  rng = np.random.default_rng(0)
  for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj):
    lin.kernel[...] = jnp.asarray(rng.normal(0, 0.15, lin.kernel.shape), jnp.float32)
  if hasattr(m, "gk_b"):
    m.gk_b[...] = jnp.asarray(rng.normal(0, 0.3, m.gk_b.shape), jnp.float32)
  T = 21
  x, pos = inputs(B=1, T=T)
  w = jax.random.normal(jax.random.PRNGKey(5), (1, T, 48))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(leaves, x):
    p = jax.tree.unflatten(jax.tree.structure(params), leaves)
    y, _ = nnx.merge(graphdef, p, rest)(x, positions=pos)
    return (y * w).sum()

  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [jax.tree_util.keystr(p) for p, _ in flat] + ["input x"]
  leaves = [a for _, a in flat]
  keys = jax.random.split(jax.random.PRNGKey(6), len(leaves) + 1)
  dirs = [jax.random.normal(k, a.shape) * (jnp.sqrt((a ** 2).mean()) + 0.1)
          for a, k in zip(leaves, keys)] + [0.3 * jax.random.normal(keys[-1], x.shape)]
  gl, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(leaves, x)
  f = jax.jit(loss)
  base = abs(float(f(leaves, x)))
  eps = 1e-3
  floor = 5e-4 * base + 1e-6        # the f32 noise of the difference quotient at this step
  bad = []
  for j, (name_j, d, g) in enumerate(zip(names, dirs, list(gl) + [gx])):
    auto = float((g * d).sum())
    def at(s):
      if j == len(leaves):
        return f(leaves, x + s * d)
      return f([a + s * d if i == j else a for i, a in enumerate(leaves)], x)
    fd = (float(at(eps)) - float(at(-eps))) / (2 * eps)
    # the leaf must move the loss measurably, or a zeroed gradient could not be told apart
    assert abs(fd) >= 3 * floor, f"{name} {name_j}: |d loss| {abs(fd):.2e} is in the noise"
    if abs(auto - fd) > 3e-2 * abs(fd) + floor:
      bad.append(f"{name_j}: autodiff {auto:.5g} vs finite difference {fd:.5g}")
  assert not bad, f"{name} ({method}): " + "; ".join(bad)
