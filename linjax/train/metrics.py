"""What a run shows and leaves behind: tqdm progress, TensorBoard scalars, `metrics.jsonl`,
and at the end `loss_curve.png` and `summary.json` in the workdir.

Only process 0 writes. `metrics.jsonl` is appended as the run goes, so the loss curve of a
run that was killed and resumed still covers every step. A resumed run passes
`resume_step=N` (the restored checkpoint's step): the rows logged after step N by the run
that died are dropped first (the file is rewritten, atomically), and TensorBoard purges its
events after N, so each step is logged once, by the run whose parameters carry on.
"""
from __future__ import annotations

import json
import math
import os
import time


class TensorBoardWriter:
  """Scalars as TensorBoard event files, through the `tensorboard` package's own event writer
  (no TensorFlow, no torch). `purge_step`: a resumed run first writes a START session log at
  that step, and TensorBoard then drops the events of earlier files from that step on (what
  the run that died logged past its last checkpoint)."""

  def __init__(self, logdir: str, purge_step: int | None = None, flush_secs: int = 10):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    self._event, self._summary = event_pb2, summary_pb2
    self._w = EventFileWriter(logdir, flush_secs=flush_secs)
    if purge_step is not None:
      self._w.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(purge_step),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def add_scalar(self, tag: str, value: float, step: int):
    value = self._summary.Summary.Value(tag=tag, simple_value=float(value))
    self._w.add_event(self._event.Event(wall_time=time.time(), step=int(step),
                                        summary=self._summary.Summary(value=[value])))

  def flush(self):
    self._w.flush()

  def close(self):
    self._w.close()


def truncate_jsonl(path: str, last_step: int) -> int:
  """Keep the rows of a metrics.jsonl with step <= last_step (and drop lines a kill cut
  short); rewritten through a temporary file and a rename. Returns the number of lines
  dropped (0, and nothing written, when there is nothing to drop or no file)."""
  if not os.path.exists(path):
    return 0
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
        ok = int(r["step"]) <= last_step
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        ok = False
      if ok:
        keep.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return dropped


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int, start_step: int, *, enabled: bool = True,
               progress: bool = True, resume_step: int | None = None):
    """resume_step: the step the run resumes from (its restored checkpoint); rows of
    metrics.jsonl with a larger step (and lines cut by a kill) are dropped. None: a fresh
    run or no truncation (the file is appended to as it is)."""
    self.workdir, self.enabled = workdir, enabled
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._bar = None
    self.dropped_rows = 0
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      self.dropped_rows = truncate_jsonl(self.jsonl, int(resume_step))
    self._tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"),
                                 None if resume_step is None else int(resume_step) + 1)
    if progress:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                       dynamic_ncols=True, smoothing=0.1)

  def write(self, step: int, scalars: dict, prefix: str = "train"):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    with open(self.jsonl, "a") as f:
      f.write(json.dumps({"step": int(step), "split": prefix, **clean,
                          "time": time.time()}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def message(self, text: str):
    """A line for the person waiting (above the progress bar; stderr), process 0 only."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      import sys
      print(text, file=sys.stderr, flush=True)

  def progress(self, n: int = 1, **postfix):
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                               for k, v in postfix.items()}, refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None

  def history(self) -> dict:
    """{"train": {step: record}, "eval": {step: record}} from metrics.jsonl."""
    out = {"train": {}, "eval": {}}
    if not os.path.exists(self.jsonl):
      return out
    with open(self.jsonl) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
          continue
        out.setdefault(r.get("split", "train"), {})[r["step"]] = r
    return out

  def plot(self, path: str | None = None) -> str | None:
    if not self.enabled:
      return None
    from matplotlib.figure import Figure   # no pyplot: leaves the caller's backend alone
    h = self.history()
    path = path or os.path.join(self.workdir, "loss_curve.png")
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    tr = sorted(h["train"].items())
    if tr:
      ax.plot([s for s, _ in tr], [r["loss"] for _, r in tr], label="train loss", lw=1)
    ev = sorted((s, r) for s, r in h["eval"].items() if "loss" in r)
    if ev:
      ax.plot([s for s, _ in ev], [r["loss"] for _, r in ev], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path

  def summary(self, summary: dict) -> str | None:
    if not self.enabled:
      return None
    path = os.path.join(self.workdir, "summary.json")
    with open(path, "w") as f:
      json.dump(summary, f, indent=1, default=str)
    return path
