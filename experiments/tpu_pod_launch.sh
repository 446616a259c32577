#!/usr/bin/env bash
# Train linjax on a Cloud TPU pod slice (every host runs the same command).
# Documented, not run in CI. Usage:
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-project \
#   CONFIG=experiments/finetune_smollm2.py:cpu WORKDIR=gs://my-bucket/runs/smollm2 \
#   MESH="--config.mesh.data=-1 --config.mesh.fsdp=8 --config.mesh.seq=4" \
#   bash experiments/tpu_pod_launch.sh
#
# How it works: `python -m linjax.train` calls `linjax.parallel.initialize()`, which calls
# `jax.distributed.initialize()` with no arguments when TPU_WORKER_HOSTNAMES lists several
# hosts (or MEGASCALE_COORDINATOR_ADDRESS is set for multislice): JAX finds the coordinator,
# the process count and this host's id from the TPU metadata. The mesh from `config.mesh`
# (data x fsdp x tensor x seq = all chips of the slice, one size may be -1) spans every host;
# every host iterates the same data and materialises only its own shards
# (`linjax.parallel.host_local_to_global`). Sequence parallelism: set `mesh.seq` > 1 and the
# linear / softmax mixers run LASP-2 / LASP-2H over that axis (keep `seq` inside a host's
# ICI domain, i.e. the last mesh axes, which `make_mesh` orders fastest-varying).
# Checkpoints (orbax) and metrics go to WORKDIR; use a gs:// path so all hosts see it.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
CONFIG=${CONFIG:-experiments/finetune_smollm2.py:cpu}
WORKDIR=${WORKDIR:?set WORKDIR (a gs:// bucket path visible to every host)}
MESH=${MESH:-"--config.mesh.data=-1"}
REPO=${REPO:-https://github.com/linjax/linjax.git}
BRANCH=${BRANCH:-main}

gcloud_ssh() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --worker=all --command "$1"
}

# 1. Same code and environment on every host.
gcloud_ssh "set -e; if [ ! -d linjax ]; then git clone -b $BRANCH $REPO linjax; fi;
  cd linjax && git fetch -q && git checkout -q $BRANCH && git pull -q;
  python3 -m venv .venv && .venv/bin/pip install -q -U pip &&
  .venv/bin/pip install -q -e '.[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# 2. Check that every host sees the whole slice (prints process index / count / devices).
gcloud_ssh "cd linjax && .venv/bin/python -c 'from linjax import parallel; import jax;
parallel.initialize(); print(jax.process_index(), jax.process_count(), jax.device_count())'"

# 3. Train. Every host runs the same command; logs from host 0 carry the metrics.
gcloud_ssh "cd linjax && XLA_PYTHON_CLIENT_PREALLOCATE=true .venv/bin/python -m linjax.train \
  --config $CONFIG --workdir $WORKDIR $MESH 2>&1 | tee -a ~/linjax_train.log"

# Resume after preemption: run step 3 again with the same WORKDIR (the trainer restores the
# latest complete checkpoint: parameters, optimizer, step, data position, RNG key).
