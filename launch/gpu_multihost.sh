#!/usr/bin/env bash
# D-DiT on several GPU hosts: run this same script on every host (by hand, pdsh, or a Slurm step).
#
#   COORDINATOR=host0:12355 NUM_HOSTS=4 HOST_ID=<0..3> \
#     launch/gpu_multihost.sh configs/stage2.py /shared/ddit/stage2 --config.init_from=/shared/ckpt/stage1
#
# Under Slurm, `srun --ntasks-per-node=1 launch/gpu_multihost.sh ...` fills the three variables from
# SLURM_* (jax.distributed.initialize() reads them itself). One process per host drives all its GPUs.
# The workdir must be a filesystem every host sees (NFS, Lustre, GCS FUSE) or a gs:// path: checkpoints,
# metrics.jsonl, TensorBoard events and samples go there; logs go to stdout/stderr of each host.
# SIGTERM (scancel, spot preemption) checkpoints and exits 0; rerunning the command resumes.
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  export DD_NUM_PROCESSES=${SLURM_NTASKS:-1}
else
  export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host:port}
  export JAX_NUM_PROCESSES=${NUM_HOSTS:?set NUM_HOSTS} JAX_PROCESS_ID=${HOST_ID:?set HOST_ID}
  export DD_NUM_PROCESSES=$JAX_NUM_PROCESSES
fi
# bf16 GEMMs and cuDNN attention; XLA's latency-hiding scheduler overlaps FSDP gathers with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec python3 -m dual_diffusion.train --config="$config" --workdir="$workdir" "$@"
