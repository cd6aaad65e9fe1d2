#!/usr/bin/env bash
# D-DiT on a Cloud TPU pod slice: create, copy the code, install, run the same command on every worker.
#
#   export TPU_NAME=ddit-v5p-64 ZONE=us-east5-a ACCELERATOR=v5p-64 VERSION=v2-alpha-tpuv5 \
#          PROJECT=my-project BUCKET=gs://my-bucket
#   launch/tpu_pod.sh create            # once
#   launch/tpu_pod.sh copy              # the working tree -> ~/dual_diffusion on every worker
#   launch/tpu_pod.sh install           # pip install -e '.[tpu,gcs]' (libtpu pinned to jax, gcsfs) on every worker
#   launch/tpu_pod.sh train configs/stage2.py $BUCKET/ddit/stage2 --config.init_from=$BUCKET/ckpt/stage1
#   launch/tpu_pod.sh logs              # tail of the training log of worker 0
#   launch/tpu_pod.sh flags             # the XLA flags train / dry_run export (dual_diffusion/aot/tpu_flags.py)
#   launch/tpu_pod.sh delete
#
# Checkpoints, metrics.jsonl, TensorBoard events and samples go to the workdir (use a gs:// path so that
# every worker sees the same one and a re-created pod resumes from it). Each worker's stdout/stderr goes
# to ~/ddit_train.log on that worker. Preemption: the TPU runtime sends SIGTERM; the run saves and exits 0;
# running the same `train` command again resumes from the latest checkpoint.
set -euo pipefail

if [[ "${1:-}" == flags ]]; then  # the XLA flags train and dry_run export (LIBTPU_INIT_ARGS); needs no pod
  cd "$(dirname "$0")/.." && exec python3 -m dual_diffusion.aot.tpu_flags
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-dual_diffusion}
# Read on the worker from the installed code, so the flags always match the code that runs.
TPU_FLAGS='LIBTPU_INIT_ARGS="$(python3 -m dual_diffusion.aot.tpu_flags)"'
ssh_all() {  # runs one command on every worker of the pod, in parallel
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="${ACCELERATOR:?set ACCELERATOR}" --version="${VERSION:?set VERSION}" \
      ${SPOT:+--spot}
    ;;
  copy)
    root=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$root" --exclude=.git --exclude='*.pyc' -czf /tmp/ddit_code.tgz .
    gcloud compute tpus tpu-vm scp /tmp/ddit_code.tgz "$TPU_NAME":/tmp/ddit_code.tgz --zone="$ZONE" \
      $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf /tmp/ddit_code.tgz"
    ;;
  install)
    ssh_all "cd ~/$REMOTE_DIR && pip install -e '.[tpu,gcs]'"
    ;;
  train)
    config=${2:?config file}; workdir=${3:?workdir (gs://...)}; shift 3
    # Same command everywhere; jax.distributed.initialize() finds the pod's other workers by itself. The XLA
    # flags are the ones the compile report (--dry_run --topology) compiles with: dual_diffusion/aot/tpu_flags.py.
    ssh_all "cd ~/$REMOTE_DIR && export $TPU_FLAGS && DD_DISTRIBUTED=1 nohup python3 -m dual_diffusion.train \
      --config=$config --workdir=$workdir $* > ~/ddit_train.log 2>&1 &"
    ;;
  dry_run)
    config=${2:?config file}; shift 2
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="cd ~/$REMOTE_DIR && export $TPU_FLAGS && python3 -m dual_diffusion.train --config=$config --dry_run $*"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker="${2:-0}" \
      --command="tail -n 50 ~/ddit_train.log"
    ;;
  stop)  # SIGTERM: every worker checkpoints and exits
    ssh_all "pkill -TERM -f 'dual_diffusion.train' || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
    ;;
  *)
    sed -n '2,20p' "$0"; exit 1
    ;;
esac
