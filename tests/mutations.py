"""Mutation check: break the code on purpose and see that the default suite notices.

    .venv/bin/python tests/mutations.py            # every mutation (minutes on 2 cores)
    .venv/bin/python tests/mutations.py sinks      # those whose name contains "sinks"
    .venv/bin/python tests/mutations.py --control  # the same tests on the unmutated copy
                                                   # (they must pass: "caught" means something)

Each mutation is a one-line source edit applied to a scratch copy of the repo (the working
tree is never touched) and the default-suite tests named for it are run there; the mutation
is "caught" when they fail. `tests/MUTATIONS.md` records the last run. Not collected by
pytest (the file name does not start with test_).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, file, original text, mutated text, pytest node ids / -k expressions)
MUTATIONS = [
    ("drop a sink (blocked attention: the last sink position falls out)",
     "linjax/ops/softmax_blocked.py",
     "& (kpos < num_sinks) & (kpos <= qp)", "& (kpos < num_sinks - 1) & (kpos <= qp)",
     ["tests/test_ops_attention.py::test_chunk_and_parallel_match_reference"]),
    ("shift every sliding window by one key",
     "linjax/ops/softmax.py", "return qp - kp < window", "return qp - kp <= window",
     ["tests/test_mixer_formulas.py"]),
    ("drop the key gradient of the blocked attention backward",
     "linjax/ops/softmax_blocked.py", "return (dq, dk + _shift(dk_d, -d), dv",
     "return (dq, dk, dv", ["tests/test_ops_attention.py::test_chunk_and_parallel_match_reference"]),
    ("cut the gradient of the Hedgehog feature-map weights",
     "linjax/ops/feature_maps.py", "  z = _project(x, w, b)\n  out = jnp.concatenate",
     "  z = _project(x, jax.lax.stop_gradient(w), b)\n  out = jnp.concatenate",
     ["tests/test_mixers.py::test_every_parameter_leaf_gradient_matches_finite_differences"]),
    ("wrap an out-of-range layer index (linearize(m, layers=[5]) on 2 layers)",
     "linjax/linearize/__init__.py", "    if not -n <= i < n:", "    if False:",
     ["tests/test_linearize.py::test_linearize_names_bad_layers_and_kwargs"]),
    ("GQA: kv heads tiled instead of repeated (wrong query-to-kv-head order)",
     "linjax/layers/base.py", "jnp.repeat(x, rep, axis=2)", "jnp.tile(x, (1, 1, rep, 1))",
     ["tests/test_mixer_formulas.py"]),
    ("LASP-2: no gradient through the gathered chunk states (cross-shard term dropped)",
     "linjax/parallel/sequence.py", "return lax.all_gather(payload, SEQ), None",
     "return lax.all_gather(lax.stop_gradient(payload), SEQ), None",
     ["tests/test_sequence_parallel.py::test_lasp2_linear_families_meshes"]),
    ("checkpoint checksums not verified on restore",
     "linjax/train/checkpoints.py", "    sums = None\n    if verify:", "    sums = None\n    if False:",
     ["tests/test_checkpoints.py::test_flipped_bytes_that_orbax_reads_silently_are_caught"]),
]


def _copy_repo(dst):
  ignore = shutil.ignore_patterns(".venv", ".git", "workdir", "runs", "__pycache__",
                                  "*.egg-info", ".pytest_cache")
  shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


def run(selected):
  py = os.path.join(ROOT, ".venv", "bin", "python")
  py = py if os.path.exists(py) else sys.executable
  rows = []
  for name, path, old, new, tests in selected:
    with tempfile.TemporaryDirectory() as tmp:
      repo = os.path.join(tmp, "repo")
      _copy_repo(repo)
      f = os.path.join(repo, path)
      src = open(f).read()
      if src.count(old) != 1:
        raise SystemExit(f"mutation {name!r}: the text to mutate occurs {src.count(old)} times "
                         f"in {path} (update tests/mutations.py)")
      open(f, "w").write(src.replace(old, new))
      t0 = time.time()
      # the scratch copy first on sys.path, so its (mutated) linjax is the one imported
      env = dict(os.environ, PYTHONPATH=repo)
      p = subprocess.run([py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-m", "not slow", *tests], cwd=repo, env=env,
                         capture_output=True, text=True)
      caught = p.returncode != 0
      failed = [ln.split(" ")[1] for ln in p.stdout.splitlines() if ln.startswith("FAILED ")]
      rows.append((name, path, tests, caught, failed, time.time() - t0))
      print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {name} ({time.time() - t0:.0f}s) "
            f"{failed[:1]}", flush=True)
  return rows


if __name__ == "__main__":
  args = sys.argv[1:]
  control = "--control" in args
  pat = next((a for a in args if not a.startswith("--")), "")
  chosen = [m for m in MUTATIONS if pat in m[0]]
  if control:   # unmutated: every listed test must pass in the scratch copy
    chosen = [("control: " + n, p, o, o, t) for n, p, o, _, t in chosen]
  rows = run(chosen)
  ok = all(not r[3] for r in rows) if control else all(r[3] for r in rows)
  sys.exit(0 if ok else 1)
