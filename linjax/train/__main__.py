"""python -m linjax.train --config experiments/<name>.py:<arg> --workdir DIR [--config.x=y]

Thin entry point: parses the ml_collections config (unknown `--config.*` overrides fail
here, naming the field) and calls `linjax.train.train(config, workdir)`.
"""
import json

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (resumes when it has checkpoints)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:   # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  from linjax.parallel import initialize
  initialize()
  from linjax.train.trainer import train
  summary = train(_CONFIG.value, _WORKDIR.value)
  summary.pop("model", None)
  print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
