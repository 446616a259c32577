"""Every kernel lowers for TPU (Pallas Mosaic) and for CUDA (Pallas Triton) from this CPU host.

`jax.export` of the jitted forward and of forward+backward, for both forward forms (fused
and two-pass), packed rows and varlen with traced offsets; the TPU grids are counted at
T = 32k. The Triton custom call carries no export compatibility guarantee, so the CUDA export
disables that one serialization check; the Triton IR has been produced by then, so a kernel
that cannot lower still fails here (what only the device's Triton / Mosaic compiler sees,
such as shared-memory or VMEM limits, is not checked).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels

B, T, H, K, V = 2, 200, 2, 128, 128
sd = lambda s, d=jnp.bfloat16: jax.ShapeDtypeStruct(s, d)


def _export(fn, platform, *args):
  checks = []
  if platform == "cuda":
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exp = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
  text = exp.mlir_module()
  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert marker in text, f"no Pallas kernel in the {platform} export"
  return exp


def _fwd_bwd(op, n_diff):
  def fwd(*a):
    return op(*a)

  def bwd(*a):  # value_and_grad: keeps the forward kernels alive in the export
    def loss(*a):
      o, s = op(*a)
      return o.astype(jnp.float32).sum() + s.sum()
    return jax.value_and_grad(loss, tuple(range(n_diff)))(*a)
  return fwd, bwd


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("kind", ["none", "scalar", "channel", "channel-fp32"])
def test_gla_lowers(platform, kind):
  dt = jnp.float32 if kind.endswith("fp32") else jnp.bfloat16
  kind = kind.split("-")[0]
  g = {"none": None, "scalar": sd((B, T, H), jnp.float32),
       "channel": sd((B, T, H, K), jnp.float32)}[kind]

  def op(q, k, v, h0, g=None):
    return pallas_kernels.gla_chunk(q, k, v, g, initial_state=h0, output_final_state=True)

  args = [sd((B, T, H, K), dt), sd((B, T, H, K), dt), sd((B, T, H, V), dt),
          sd((B, H, K, V), jnp.float32)]
  if g is not None:
    args.append(g)
  for fn in _fwd_bwd(op, len(args)):
    _export(fn, platform, *args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_lowers(platform, gated):
  def op(q, k, v, beta, h0, g=None):
    return pallas_kernels.delta_rule_chunk(q, k, v, beta, g, initial_state=h0,
                                           output_final_state=True)

  args = [sd((B, T, H, K)), sd((B, T, H, K)), sd((B, T, H, V)), sd((B, T, H), jnp.float32),
          sd((B, H, K, V), jnp.float32)]
  if gated:
    args.append(sd((B, T, H), jnp.float32))
  for fn in _fwd_bwd(op, len(args)):
    _export(fn, platform, *args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", ["gla_channel", "delta_gated"])
def test_head_dim_256_lowers(platform, op):
  """The largest head dim the issue names (256), bf16, forward and forward + backward."""
  K2 = V2 = 256
  args = [sd((1, 128, 2, K2)), sd((1, 128, 2, K2)), sd((1, 128, 2, V2)),
          sd((1, 2, K2, V2), jnp.float32)]
  if op == "gla_channel":
    args.append(sd((1, 128, 2, K2), jnp.float32))

    def fn(q, k, v, h0, g):
      return pallas_kernels.gla_chunk(q, k, v, g, initial_state=h0, output_final_state=True)
  else:
    args += [sd((1, 128, 2), jnp.float32), sd((1, 128, 2), jnp.float32)]

    def fn(q, k, v, h0, beta, g):
      return pallas_kernels.delta_rule_chunk(q, k, v, beta, g, initial_state=h0,
                                             output_final_state=True)
  for f in _fwd_bwd(fn, len(args)):
    _export(f, platform, *args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", ["gla_scalar", "delta_gated"])
def test_segment_ids_lower(platform, op):
  """Packed rows (segment_ids) through the kernels, forward and forward + backward."""
  seg = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) // 50, (B, T))
  args = [sd((B, T, H, K)), sd((B, T, H, K)), sd((B, T, H, V)), sd((B, H, K, V), jnp.float32),
          sd((B, T, H), jnp.float32)]
  if op == "gla_scalar":
    def fn(q, k, v, h0, g):
      return pallas_kernels.gla_chunk(q, k, v, g, initial_state=h0, output_final_state=True,
                                      segment_ids=seg)
  else:
    args.append(sd((B, T, H), jnp.float32))

    def fn(q, k, v, h0, beta, g):
      return pallas_kernels.delta_rule_chunk(q, k, v, beta, g, initial_state=h0,
                                             output_final_state=True, segment_ids=seg)
  for f in _fwd_bwd(fn, len(args)):
    _export(f, platform, *args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", ["gla_channel", "gla_none", "delta_gated"])
@pytest.mark.parametrize("form", ["fused", "two_pass"])
def test_forms_lower(platform, op, form):
  """Both forward forms on both platforms (the shape rule alone picks one per platform)."""
  args = [sd((B, T, H, K)), sd((B, T, H, K)), sd((B, T, H, V)), sd((B, H, K, V), jnp.float32)]
  if op == "delta_gated":
    args += [sd((B, T, H), jnp.float32), sd((B, T, H), jnp.float32)]

    def fn(q, k, v, h0, beta, g):
      return pallas_kernels.delta_rule_chunk(q, k, v, beta, g, initial_state=h0,
                                             output_final_state=True, form=form)
  else:
    if op == "gla_channel":
      args.append(sd((B, T, H, K), jnp.float32))

    def fn(q, k, v, h0, g=None):
      return pallas_kernels.gla_chunk(q, k, v, g, initial_state=h0, output_final_state=True,
                                      form=form)
  for f in _fwd_bwd(fn, len(args)):
    _export(f, platform, *args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", ["gla_channel", "delta_gated"])
def test_varlen_traced_lowers(platform, op):
  """cu_seqlens as a traced argument: the aligned layout, the chunk flags (SMEM on TPU) and
  the N initial / final states per head, forward and forward + backward."""
  N = 4
  args = [sd((1, T, H, K)), sd((1, T, H, K)), sd((1, T, H, V)), sd((N, H, K, V), jnp.float32),
          sd((N + 1,), jnp.int32)]
  if op == "gla_channel":
    args.append(sd((1, T, H, K), jnp.float32))

    def fn(q, k, v, h0, cu, g):
      return pallas_kernels.gla_chunk(q, k, v, g, initial_state=h0, output_final_state=True,
                                      cu_seqlens=cu)
    n_diff = 4
  else:
    args += [sd((1, T, H), jnp.float32), sd((1, T, H), jnp.float32)]

    def fn(q, k, v, h0, cu, beta, g):
      return pallas_kernels.delta_rule_chunk(q, k, v, beta, g, initial_state=h0,
                                             output_final_state=True, cu_seqlens=cu)
    n_diff = 4

  def bwd(*a):
    def loss(*d):
      o, s = fn(*d, *a[n_diff:])
      return o.astype(jnp.float32).sum() + s.sum()
    return jax.value_and_grad(loss, tuple(range(n_diff)))(*a[:n_diff])
  _export(fn, platform, *args)
  _export(bwd, platform, *args)


def _pallas_grids(jaxpr):
  """Grid of every pallas_call in a jaxpr (nested jaxprs included)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      out.append((str(eqn.params["name"]), eqn.params["grid_mapping"].grid))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          out += _pallas_grids(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          out += _pallas_grids(sub)
  return out


@pytest.mark.parametrize("op", ["gla_scalar", "gla_channel", "delta_gated"])
def test_tpu_grid_steps_at_32k(op):
  """At T = 32k (B=2, H=16, D=128) every TPU kernel of forward + backward runs <= 1024 grid
  steps (G = 16 chunks of 64 per step)."""
  from pallas_kernels.delta import delta_rule_chunk_impl
  from pallas_kernels.gla import gla_chunk_impl
  Bb, Tt, Hh, D = 2, 32768, 16, 128
  x = [sd((Bb, Tt, Hh, D)), sd((Bb, Tt, Hh, D)), sd((Bb, Tt, Hh, D))]
  kw = dict(scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
            chunk_size=64, interpret=False, backend="tpu")
  if op == "delta_gated":
    x += [sd((Bb, Tt, Hh), jnp.float32), sd((Bb, Tt, Hh), jnp.float32)]
    call = lambda q, k, v, beta, g: delta_rule_chunk_impl(q, k, v, beta, g, **kw)[0]
  else:
    x.append(sd((Bb, Tt, Hh) + ((D,) if op == "gla_channel" else ()), jnp.float32))
    call = lambda q, k, v, g: gla_chunk_impl(q, k, v, g, **kw)[0]
  loss = lambda *a: call(*a).astype(jnp.float32).sum()
  grids = _pallas_grids(jax.make_jaxpr(jax.value_and_grad(loss, range(len(x))))(*x).jaxpr)
  names = {n for n, _ in grids}
  assert {"linjax_fused_pass", "linjax_state_pass", "linjax_chunk_grads"} <= names, names
  for name, grid in grids:
    steps = 1
    for d in grid:
      steps *= d
    assert steps <= 1024, (name, grid)
