"""grain vs the trainer's own iterator (`linjax.data.pipeline.DataIterator`): speed, resume,
multi-host sharding. grain is not a linjax dependency; this script decides whether it should
be (`pip install grain` first).

    python benchmarks/data_grain.py --out benchmarks/results/data_grain.md

Three ways to serve the same packed rows as [B, T] batches (input_ids, targets, loss_mask,
segment_ids, positions):
  linjax        DataIterator: a per-epoch permutation (numpy PCG64 seeded by [seed, epoch]);
                global batch i = rows perm[i*GB:(i+1)*GB], host p of P takes its slice; the
                whole state is `position`.
  grain map     grain.MapDataset: range(N).shuffle(seed).repeat().batch(GB), each host
                slicing its part of global batch i, then the rows gathered: random access,
                so the state is again the batch index.
  grain loader  grain.DataLoader over an IndexSampler (ShardOptions per host, shuffle, seed)
                with a Batch(GB / P) operation, worker_count=0: grain's documented multi-host
                path; its iterator state is get_state() / set_state().
Measured: batches per second (after one warm-up batch), whether a run stopped at batch k and
resumed from its saved state gives the batches of an uninterrupted run, the size of that
state, and whether the global batch is the same rows for 1 and 4 hosts (a run on a pod then
trains on the data a single-device run trains on, which the project's tests rely on).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from linjax.data.pipeline import DataIterator, PackedData, make_batch


def packed(n_rows: int, seq_len: int, seed: int = 0) -> PackedData:
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, 49152, (n_rows, seq_len), dtype=np.int32)
  seg = np.cumsum(rng.random((n_rows, seq_len)) < 1 / 300, axis=1).astype(np.int32) + 1
  pos = np.zeros_like(seg)
  for r in range(n_rows):            # positions restart with every segment
    starts = np.r_[0, np.nonzero(np.diff(seg[r]))[0] + 1]
    lens = np.diff(np.r_[starts, seq_len])
    pos[r] = np.arange(seq_len) - np.repeat(starts, lens)
  return PackedData(toks, seg, pos)


def linjax_iter(data, gb, p, pc, seed, state=None):
  it = DataIterator(data, gb, seed=seed, process_index=p, process_count=pc,
                    position=0 if state is None else state["position"])
  return it, lambda: it.state()


def grain_map_iter(data, gb, p, pc, seed, state=None):
  import grain
  local = gb // pc
  ds = (grain.MapDataset.range(len(data)).shuffle(seed=seed).repeat().batch(gb)
        .map(lambda idx: data.rows(np.asarray(idx)[p * local:(p + 1) * local])))
  pos = {"i": 0 if state is None else state["index"]}

  def gen():
    while True:
      b = ds[pos["i"]]
      pos["i"] += 1
      yield b
  return gen(), lambda: {"index": pos["i"]}


def grain_loader_iter(data, gb, p, pc, seed, state=None):
  import grain

  class Source:
    def __repr__(self):               # grain validates a restored state against repr(source)
      return f"PackedRows(n={len(data)}, seq_len={data.seq_len})"

    def __len__(self):
      return len(data)

    def __getitem__(self, i):
      return {"input_ids": data.tokens[i], "segment_ids": data.segment_ids[i],
              "positions": data.positions[i]}

  class ToBatch(grain.transforms.Map):
    def map(self, b):
      return make_batch(b["input_ids"], b["segment_ids"], b["positions"])

  sampler = grain.samplers.IndexSampler(
      num_records=len(data), shard_options=grain.sharding.ShardOptions(p, pc, drop_remainder=True),
      shuffle=True, num_epochs=None, seed=seed)
  loader = grain.DataLoader(data_source=Source(), sampler=sampler, worker_count=0,
                            operations=[grain.transforms.Batch(gb // pc, drop_remainder=True),
                                        ToBatch()])
  it = iter(loader)
  if state is not None:
    it.set_state(state)
  return it, it.get_state


WAYS = {"linjax": linjax_iter, "grain map": grain_map_iter, "grain loader": grain_loader_iter}


def same(a, b) -> bool:
  return all(np.array_equal(a[k], b[k]) for k in a)


def measure(make, data, gb, steps, seed=0) -> dict:
  it, _ = make(data, gb, 0, 1, seed)
  next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  rate = steps / (time.perf_counter() - t0)
  # resume: stop after k batches, rebuild from the saved state, compare the next ones
  k, more = 7, 5
  it, state = make(data, gb, 0, 1, seed)
  ref = [next(it) for _ in range(k + more)]
  it, state = make(data, gb, 0, 1, seed)
  for _ in range(k):
    next(it)
  saved = state()
  it2, _ = make(data, gb, 0, 1, seed, saved)
  resumed = all(same(next(it2), r) for r in ref[k:])
  # host-count invariance: global batch j from 4 hosts == from 1 host
  hosts = 4
  one, _ = make(data, gb, 0, 1, seed)
  one = [next(one) for _ in range(3)]
  parts = [make(data, gb, h, hosts, seed)[0] for h in range(hosts)]
  four = [[next(it) for _ in range(3)] for it in parts]
  invariant = all(
      np.array_equal(np.concatenate([four[h][j]["input_ids"] for h in range(hosts)]),
                     one[j]["input_ids"]) for j in range(3))
  disjoint = len({r.tobytes() for h in range(hosts) for r in four[h][0]["input_ids"]}) == gb
  return {"rate": rate, "resumed": resumed, "state_bytes": len(repr(saved)),
          "invariant": invariant, "disjoint": disjoint, "state": saved}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=2048)
  p.add_argument("--shapes", default="8x512,64x2048", help="GBxT,...")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  try:
    import grain
  except ImportError as e:
    raise SystemExit("this benchmark compares against grain: pip install grain") from e
  load0 = os.getloadavg()[0]
  lines = ["| GB x T | iterator | batches/s | tokens/s | resume = uninterrupted | state "
           "(bytes) | global batch same on 1 and 4 hosts | hosts' rows disjoint |",
           "|---|---|---:|---:|---|---:|---|---|"]
  for shape in a.shapes.split(","):
    gb, t = map(int, shape.split("x"))
    data = packed(a.rows, t)
    for name, make in WAYS.items():
      r = measure(make, data, gb, a.steps)
      lines.append(f"| {gb} x {t} | {name} | {r['rate']:,.0f} | {r['rate'] * gb * t:,.0f} | "
                   f"{'yes' if r['resumed'] else 'NO'} | {r['state_bytes']} | "
                   f"{'yes' if r['invariant'] else 'no'} | {'yes' if r['disjoint'] else 'NO'} |")
      print(lines[-1], flush=True)
      if shape == a.shapes.split(",")[0]:
        print(f"  {name} state: {r['state']!r}"[:300], flush=True)
  head = (f"grain {getattr(grain, '__version__', '?')} vs linjax.data.pipeline.DataIterator, "
          f"{a.rows} packed rows, {a.steps} batches timed, 1 process (host slices computed "
          f"in-process), {os.cpu_count()}-core CPU, load {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at the end, {time.strftime('%Y-%m-%d')}. "
          "`python benchmarks/data_grain.py`")
  text = head + "\n\n" + "\n".join(lines)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
