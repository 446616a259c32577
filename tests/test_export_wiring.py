"""`method="auto"` reaches the fast kernels end to end: the trainer's own jitted train step of a
linearized student (KL to its softmax teacher, the student's weights updated by optax) is
exported with `jax.export` for CUDA and for TPU from this CPU host, and the exported module
holds the Pallas kernels (Triton on CUDA, Mosaic on TPU) for the linear mixers and the fused
attention path for the softmax teacher (the Pallas flash kernel on CUDA, splash attention on
TPU: the trainer's rows carry positions and segment ids, which cuDNN's fused attention does
not take; its own lowering needs cuDNN installed, so it cannot be exported from this host).
The same step lowered for the CPU has none of them: the choice is made by the platform
compiled for, not by the host.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from linjax.linearize import linearize
from linjax.models.llama import Llama, LlamaConfig
from linjax.train import optim as optim_lib
from linjax.train.config import stage
from linjax.train.objectives import make_objective
from linjax.train.trainer import make_train_step
from tests.test_pallas_lowering import _export

TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"
MARKERS = {"cuda": TRITON, "tpu": MOSAIC}
B, T = 2, 128
# kernel names in the exported module: the chunk recurrence forward (state pass) and backward
# (chunk grads) of pallas_kernels, the delta rule's WY kernels, the attention kernels of
# jax.experimental.pallas.ops (Triton flash "mha_*" on CUDA, splash on TPU)
RECURRENCE = ("linjax_state_pass", "linjax_chunk_grads")
DELTA = ("linjax_delta_wy", "linjax_delta_wy_bwd")
ATTENTION = {"cuda": ("mha_forward", "mha_backward"),
             "tpu": ("splash_mqa_fwd", "splash_mqa_dkv", "splash_mqa_dq")}

# one mixer per kernel family and every hybrid (the rest share these ops)
STUDENTS = [("gla", {}), ("gated_deltanet", {}), ("lolcats", dict(window=32)),
            ("liger", dict(window=32)), ("linear", dict(feature_map="hedgehog"))]


def teacher(dtype=jnp.float32):
  cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                    max_position_embeddings=512, dtype=jnp.dtype(dtype).name)
  return Llama(cfg, rngs=nnx.Rngs(0))


def train_step_module(student, teach, weights, platform):
  """The text of the trainer's train step (make_train_step, as `linjax.train` builds it)
  exported for `platform`."""
  wrt = optim_lib.trainable_filter("all")
  optimizer = nnx.Optimizer(student, optim_lib.make_optimizer(stage().optim), wrt=wrt)
  graphdef, state = nnx.split((student, optimizer))
  objective = make_objective(weights)
  tg, ts = nnx.split(teach) if objective.needs_teacher else (None, None)
  step = make_train_step(graphdef, None, tg, wrt, objective, accum=1, plateau=False,
                         state_sh=None, batch_sh=None, teacher_sh=None)
  tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
  batch = {"input_ids": tok, "targets": tok, "loss_mask": tok,
           "segment_ids": tok, "positions": tok}
  args = (state, ts, batch, jnp.int32(0), jnp.float32(1e-3))
  if platform == "cpu":
    return step.lower(*args).as_text()
  return _export(step, platform, *args).mlir_module()   # asserts a Pallas call is in it


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name,kw", STUDENTS, ids=[s[0] for s in STUDENTS])
def test_student_train_step_exports_with_the_kernels(name, kw, platform):
  teach = teacher()
  student = linearize(teach, name, layers=[0], method="auto", **kw)
  student_only = linearize(teacher(), name, method="auto", **kw)   # every layer linear
  want = RECURRENCE + (DELTA if "delta" in name else ())
  text = train_step_module(student_only, teach, {"ce": 1.0}, platform)
  assert MARKERS[platform] in text, f"{name}: no Pallas kernel in the {platform} train step"
  for k in want:
    assert k in text, f"{name}: kernel {k} missing from the {platform} train step"
  # the KL step runs the student (layer 0 linear, layer 1 softmax) and the softmax teacher
  text = train_step_module(student, teach, {"kl": 1.0}, platform)
  for k in want + ATTENTION[platform]:
    assert k in text, f"{name} + teacher: kernel {k} missing from the {platform} train step"
  cpu = train_step_module(student, teach, {"kl": 1.0}, "cpu")
  assert TRITON not in cpu and MOSAIC not in cpu, f"{name}: a device kernel in the CPU step"


@pytest.mark.parametrize("platform,dtype", [
    ("cuda", jnp.bfloat16), ("cuda", jnp.float32), ("tpu", jnp.bfloat16)])
def test_softmax_teacher_uses_the_fused_attention(platform, dtype):
  teach = teacher(dtype)
  text = train_step_module(teach, teach, {"ce": 1.0}, platform)
  for k in ATTENTION[platform]:
    assert k in text, f"the softmax Llama's {platform} train step has no {k} kernel"
  cpu = train_step_module(teach, teach, {"ce": 1.0}, "cpu")
  assert MARKERS[platform] not in cpu
