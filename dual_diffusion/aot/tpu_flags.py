r"""The XLA / libtpu flags of TPU runs, in one place: `launch/tpu_pod.sh` exports them as
LIBTPU_INIT_ARGS on every worker, and the compile report (`train --dry_run --topology=...`) compiles
with the same ones, so the program it measures is the one the pod runs.

    python -m dual_diffusion.aot.tpu_flags        # prints them, space-separated (what tpu_pod.sh reads)

They let collectives overlap compute (MaxText's sets in benchmarks/xla_flags_library.py, read 2026-12):
FSDP's weight gathers and the gradients' reductions run asynchronously, fused into the neighbouring
computation, several steps ahead. Every flag is accepted by libtpu 0.0.42.1 (an unknown one aborts the
process at startup; tests/test_tpu_compile.py compiles with all of them).
"""
from __future__ import annotations

# name -> value, with why. Booleans are written "true"/"false" as libtpu expects.
TPU_FLAGS: dict[str, str] = {
    # Continuation fusion: collectives run asynchronously inside fusions, overlapping the compute around them.
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",  # FSDP's weight gathers
    "xla_tpu_enable_async_collective_fusion_fuse_all_reduce": "true",  # gradient all-reduces (data, DCN)
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",  # start a gather several ops early
    "xla_tpu_overlap_compute_collective_tc": "true",  # overlap on the TensorCore itself
    "xla_enable_async_all_gather": "true",
    "xla_enable_async_all_reduce": "true",
    "xla_enable_async_collective_permute": "true",  # the rings XLA builds gathers from
    # Data parallelism over the DCN (several slices): pipeline and optimise the gradient all-reduces.
    "xla_tpu_enable_data_parallel_all_reduce_opt": "true",
    "xla_tpu_data_parallel_opt_different_sized_ops": "true",
    # Reduce-scatter fusion (all-reduce + dynamic-slice -> reduce-scatter) for the gradients.
    "xla_tpu_use_minor_sharding_for_major_trivial_input": "true",
    "xla_tpu_relayout_group_size_threshold_for_reduce_scatter": "1",
    "xla_tpu_assign_all_reduce_scatter_layout": "true",
    # Start the backward pass's weight gathers early (remat re-gathers the scanned layers' weights).
    "xla_tpu_enable_ag_backward_pipelining": "true",
}


def libtpu_init_args(flags: dict[str, str] | None = None) -> str:
    """'--name=value ...': the LIBTPU_INIT_ARGS of a TPU run."""
    return " ".join(f"--{k}={v}" for k, v in (TPU_FLAGS if flags is None else flags).items())


def compiler_options(flags: dict[str, str] | None = None) -> dict[str, str]:
    """The same flags as `jax.stages.Lowered.compile(compiler_options=...)` takes them (an unknown one raises)."""
    return dict(TPU_FLAGS if flags is None else flags)


if __name__ == "__main__":
    print(libtpu_init_args())
