"""Block sizes, forms and grid shapes of the chunkwise kernels, chosen per shape.

Every choice a kernel makes about its shape comes from here, so a GPU / TPU run can replace
it without touching the kernels:

  seq_tiles(kernel, backend, dtype, B, H, Kp, Vp, full_k)  -> Tiles for a sequential pass
  par_tiles(kernel, backend, dtype, Kp, Vp)                 -> Tiles for a parallel pass
  chunks_per_step(backend, B, H, NT)                        -> G, chunks per grid step
  use_fused(backend, B, H, Vp, NT, dtype)                   -> fused or two-pass forward

GPU (Pallas Triton). The sequential passes (state pass, reverse state pass, fused forward)
run one program per (batch, head, K tile, V tile), looping over chunks; the tiles are
shrunk (down to 32 wide) until B * H * tiles reaches `GPU_PROGRAMS` (about one program per
SM of an H100 / H200: 132 SMs). Passes whose step needs the whole key dimension of the
state (the fused forward, everything of the delta rule) tile V only. The parallel passes
(output, grads) run one program per (batch, head, chunk), with V tiles for fp32 inputs so
the fp32 [K, V] blocks stay within shared memory.

TPU (Pallas Mosaic). Every kernel takes G chunks per grid step (a loop inside the step), G
the smallest power of two that brings the grid to <= `TPU_MAX_STEPS` steps (at most 16
chunks, no more chunks than the sequence has, and at most what keeps the largest kernel's
double-buffered blocks within `TPU_VMEM_BYTES`: the grads kernel's q, k, v, do, dq, dk, dv
rows, its two fp32 [K, V] chunk states and its lane-padded gate columns; at D = 128, C = 64
that is ~0.3 MB a chunk, so G = 16 fits; at D = 256, ~0.8 MB: G = 4); the time axis is padded to a
multiple of G chunks. Blocks are whole head dims (multiples of 128).

Form of the forward (`use_fused`): the fused kernel moves q, k, v and o once (state in
registers / VMEM, chunk states never written); the two-pass form also writes and reads
every chunk state but runs its output pass over all chunks in parallel. GPU: fused when the
sequential programs alone fill the chip (B * H * V tiles >= GPU_PROGRAMS / 2), two-pass
otherwise (few heads: the fused loop would leave most SMs idle). TPU: always fused (the grid
runs in sequence on a core anyway, so the parallelism of the two-pass form buys nothing).

Status: NOT YET MEASURED ON A GPU OR TPU. The numbers below are the reasoning above, written
before any device run; `benchmarks/gpu_run.py` times the candidates and prints the winners
in the format of `TABLE`, to be committed here (set `measured=True` on each row it fills).
`override(...)` replaces any choice for a block of code (used by that sweep and the tests).
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax.numpy as jnp

GPU_PROGRAMS = 128     # target number of programs of a sequential pass (H100: 132 SMs)
TPU_MAX_STEPS = 1024   # target grid size of a TPU kernel
TPU_MAX_G = 16         # at most this many chunks per TPU grid step
TPU_VMEM_BYTES = 12 << 20   # budget for one kernel's double-buffered blocks


@dataclasses.dataclass(frozen=True)
class Tiles:
  BK: int = 0          # key-dim tile (0: the whole padded K)
  BV: int = 0          # value-dim tile (0: the whole padded V)
  num_warps: int = 4
  num_stages: int = 2
  measured: bool = False


# (kernel, dtype) -> tiles for head dims up to 128 on a GPU; larger head dims halve BV.
# kernel: "state" (GLA state passes, K tiles allowed), "fused", "delta_state" (V tiles only),
# "output", "grads", "wy".
TABLE = {
    ("state", "bfloat16"): Tiles(BK=64, BV=64, num_warps=4, num_stages=2),
    ("state", "float32"): Tiles(BK=64, BV=32, num_warps=4, num_stages=1),
    ("delta_state", "bfloat16"): Tiles(BV=32, num_warps=4, num_stages=2),
    ("delta_state", "float32"): Tiles(BV=32, num_warps=4, num_stages=1),
    ("fused", "bfloat16"): Tiles(BV=64, num_warps=4, num_stages=2),
    ("fused", "float32"): Tiles(BV=32, num_warps=4, num_stages=1),
    ("output", "bfloat16"): Tiles(BV=0, num_warps=4, num_stages=2),
    ("output", "float32"): Tiles(BV=64, num_warps=4, num_stages=1),
    ("grads", "bfloat16"): Tiles(BV=0, num_warps=8, num_stages=1),
    ("grads", "float32"): Tiles(BV=64, num_warps=8, num_stages=1),
    ("wy", "bfloat16"): Tiles(num_warps=4, num_stages=1),
    ("wy", "float32"): Tiles(num_warps=4, num_stages=1),
}

_OVERRIDE: dict = {}


@contextlib.contextmanager
def override(**kw):
  """Temporarily replace choices: `tiles={(kernel, dtype): Tiles(...)}`, `fused=True/False`,
  `G=int`, `gpu_programs=int`. The kernels' compiled forms are cached per choice."""
  old = dict(_OVERRIDE)
  tiles = dict(_OVERRIDE.get("tiles", {}))
  tiles.update(kw.pop("tiles", {}))
  _OVERRIDE.update(kw, tiles=tiles)
  try:
    yield
  finally:
    _OVERRIDE.clear()
    _OVERRIDE.update(old)


def _entry(kernel, dtype):
  key = (kernel, jnp.dtype(dtype).name)
  tab = _OVERRIDE.get("tiles", {})
  if key in tab:
    return tab[key]
  return TABLE.get(key, TABLE[(kernel, "float32")])


def _fit(n, tile):
  """The tile, at most n, dividing n (n and tile powers of two on GPU)."""
  t = min(n, tile) if tile else n
  while n % t:
    t //= 2
  return max(t, 1)


def seq_tiles(kernel, backend, dtype, B, H, Kp, Vp):
  """Tiles of a sequential pass ("state", "fused", "delta_state"): BK, BV dividing Kp, Vp.
  GPU: shrink BV, then BK (state only), down to 32, until B*H*NK*NV >= GPU_PROGRAMS."""
  if backend == "tpu":
    return Tiles(BK=Kp, BV=Vp)
  e = _entry(kernel, dtype)
  big = max(Kp, Vp) > 128
  BV = _fit(Vp, (e.BV or Vp) // (2 if big else 1))
  BK = _fit(Kp, e.BK or Kp) if kernel == "state" else Kp
  if not e.measured:
    target = _OVERRIDE.get("gpu_programs", GPU_PROGRAMS)
    while B * H * (Kp // BK) * (Vp // BV) < target and (BV > 32 or (kernel == "state" and BK > 32)):
      if BV > 32:
        BV //= 2
      else:
        BK //= 2
  return dataclasses.replace(e, BK=BK, BV=BV)


def par_tiles(kernel, backend, dtype, Kp, Vp):
  """Tiles of a parallel pass ("output", "grads", "wy"); BK is always the whole K."""
  if backend == "tpu":
    return Tiles(BK=Kp, BV=Vp)
  e = _entry(kernel, dtype)
  BV = _fit(Vp, e.BV or Vp)
  if max(Kp, Vp) > 128 and kernel in ("output", "grads"):
    BV = _fit(Vp, min(BV, 64))
  return dataclasses.replace(e, BK=Kp, BV=BV)


def tpu_chunk_bytes(C, Kp, Vp):
  """VMEM bytes one chunk of the grads kernel's blocks takes (the largest TPU kernel)."""
  rows = C * (4 * Kp + 3 * Vp) * 2          # q, k, dq, dk and v, do, dv (bf16)
  states = 2 * Kp * Vp * 4                  # h_c and dh_c (fp32)
  cols = 2 * C * 128 * 4                    # gate column and dg, lane-padded (fp32)
  return rows + states + cols


def chunks_per_step(backend, B, H, NT, C=64, Kp=128, Vp=128):
  """G, chunks per grid step: 1 on GPU; on TPU the smallest power of two with
  B * H * ceil(NT / G) <= TPU_MAX_STEPS, capped at TPU_MAX_G, at NT and by TPU_VMEM_BYTES
  (two buffers of G chunks of `tpu_chunk_bytes`)."""
  if "G" in _OVERRIDE:
    return int(_OVERRIDE["G"])
  if backend != "tpu":
    return 1
  cap = max(1, TPU_VMEM_BYTES // (2 * tpu_chunk_bytes(C, Kp, Vp)))
  G = 1
  while (G < min(TPU_MAX_G, cap) and G < NT and B * H * -(-NT // G) > TPU_MAX_STEPS
         and 2 * G <= cap):
    G *= 2
  return G


def use_fused(backend, B, H, Vp, NT, dtype):
  """The forward form: True = fused (one sequential pass writing o), False = two-pass."""
  if "fused" in _OVERRIDE:
    return bool(_OVERRIDE["fused"])
  if backend == "tpu":
    return True
  BV = seq_tiles("fused", backend, dtype, B, H, Vp, Vp).BV   # (the fused pass takes all of K)
  return B * H * (Vp // BV) >= _OVERRIDE.get("gpu_programs", GPU_PROGRAMS) // 2
