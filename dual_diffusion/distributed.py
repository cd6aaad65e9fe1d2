"""Joining a multi-process JAX cluster from the environment, for every entry point (train, sample, evaluate).

Every process of a multi-host run executes the same command. The cluster is found:
- explicitly, from JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID
  (launch/gpu_multihost.sh; several CPU processes on one machine in the tests, with
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo);
- by JAX itself on a TPU pod (TPU_WORKER_HOSTNAMES lists several workers) or under Slurm
  (DD_DISTRIBUTED=1 or DD_NUM_PROCESSES > 1).
A single-host run does nothing.
"""
from __future__ import annotations

import os


def initialize_from_env(environ=None) -> bool:
    """Calls jax.distributed.initialize when the environment describes a cluster; True if it did."""
    env = os.environ if environ is None else environ
    import jax

    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']} is set but {missing} "
                             "are not (every process needs the process count and its own id)")
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
        return True
    if (env.get("DD_DISTRIBUTED") == "1" or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
            or int(env.get("DD_NUM_PROCESSES", "1")) > 1):
        jax.distributed.initialize()
        return True
    return False


def barrier(name: str, timeout_s: float = 1800) -> None:
    """Every process waits here for the others (no-op with one process).

    Through the coordination service, not a device collective: on CPU clusters a collective's gloo
    context gives up after 30 s, while one process may spend longer alone (training the tokenizer,
    compiling the step on a loaded host). Each name may be used once per run.
    """
    import jax
    from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize made

    if jax.process_count() == 1:
        return
    client = jax_distributed.global_state.client
    if client is None:  # a cluster JAX joined by itself without a client: fall back to a device barrier
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))
