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
  app.run(main)
