"""python -m linjax.train --config experiments/<name>.py:<arg> --workdir DIR [--config.x=y]

Thin entry point: parses the ml_collections config (unknown `--config.*` overrides fail
here, naming the field), calls `linjax.train.train(config, workdir)` and prints what the run
did: one line per stage and, when the config asks for it, the held-out evaluation table.
Everything else is in DIR (summary.json, loss_curve.png, per-stage metrics).
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (resumes when it has checkpoints)")
flags.mark_flags_as_required(["config", "workdir"])


def report(summary) -> str:
  lines = []
  for s in summary["stages"]:
    if s.get("skipped"):
      lines.append(f"stage {s['stage']}: skipped (0 steps)")
      continue
    first, last = s.get("first_loss"), s.get("final_loss")
    loss = "" if first is None or last is None else f", loss {first:.4g} -> {last:.4g}"
    val = "" if s.get("val_loss") is None else f", validation {s['val_loss']:.4g}"
    best = "" if not s.get("best") else f" (best at step {s['best']['step']})"
    lines.append(f"stage {s['stage']}: {s['steps']} steps, {s['tokens']:,} tokens, "
                 f"{s['seconds']:.0f} s{loss}{val}{best}")
  if summary.get("evaluation"):
    from linjax.eval.suite import results_table
    lines += ["", results_table(summary["evaluation"])]
  gen = summary.get("generations")
  if gen:
    grows = gen.get("student_growing_mib", 0.0)
    part = ("fixed" if grows < 0.05 else f"{grows:.1f} MiB of it a softmax KV cache that grows "
            "with the context")
    lines += ["", f"Decode state at {gen['context']:,} tokens of context, batch 1: student "
              f"{gen['student_state_mib']:.1f} MiB ({part})" + (
                  f", teacher KV cache {gen['teacher_kv_cache_mib']:.1f} MiB (grows with the "
                  "context)" if "teacher_kv_cache_mib" in gen else ""),
              "Student generations (greedy):"]
    lines += [f"  {p!r} -> {t!r}" for p, t in gen["samples"].items()]
  if summary.get("model_dir"):
    lines.append(f"model: {summary['model_dir']}  (linjax.from_pretrained)")
  lines.append(f"run: {summary['workdir']} ({summary['wall_s'] / 60:.1f} min)")
  return "\n".join(lines)


def usage(prog: str = "python -m linjax.train") -> str:
  """--help of `python -m linjax.train`, `linjax train` and `linjax linearize`."""
  import glob
  import os
  import pathlib
  from linjax.train.config import base_config, stage
  c = base_config()
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  exps = sorted(os.path.relpath(f, root) for f in glob.glob(os.path.join(root, "experiments", "*.py"))
                if "def get_config" in pathlib.Path(f).read_text(encoding="utf-8"))

  def names(d):
    return ", ".join(f"{k}.*" if hasattr(d[k], "keys") else k for k in sorted(d.keys()))
  return "\n".join([
      f"usage: {prog} --config FILE.py[:ARG] --workdir DIR [--config.FIELD=VALUE ...]", "",
      "Runs a config of linjax's training loop: the stages of c.stages in order (a recipe's",
      "`linearize` field swaps the mixers first), with checkpoints, TensorBoard and loss PNGs",
      "in DIR; the same command resumes a killed run.", "",
      "  --config FILE.py[:ARG]   an ml_collections config file; ARG goes to its get_config(arg)",
      "  --config.FIELD=VALUE     override any field (unknown fields are an error), e.g.",
      "                           --config.stages.finetune.steps=20 --config.model.method=pallas",
      "  --workdir DIR            run directory (resumes when it has checkpoints)",
      "  --helpfull               every absl flag", "",
      f"config fields: {names(c)}",
      f"per stage (--config.stages.NAME.FIELD): {names(stage())}",
      "", "configs in experiments/ (each docstring lists its ARGs):",
      *[f"  {e}" for e in exps]])


def run(argv) -> int:
  """Entry point of every way in: argv[0] is the program name shown in --help."""
  if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
    print(usage(argv[0]))
    return 0
  app.run(main, argv=argv)
  return 0


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:   # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  from linjax.parallel import initialize
  initialize()
  from linjax.train.trainer import train
  summary = train(_CONFIG.value, _WORKDIR.value)
  print(report(summary), flush=True)


if __name__ == "__main__":
  import sys
  sys.exit(run(["python -m linjax.train"] + sys.argv[1:]))
