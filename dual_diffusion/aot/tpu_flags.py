r"""The XLA / libtpu flags of TPU runs, in one place: `launch/tpu_pod.sh` exports them as
LIBTPU_INIT_ARGS on every worker, and the compile report (`train --dry_run --topology=...`) compiles
with the same ones, so the program it measures is the one the pod runs.

    python -m dual_diffusion.aot.tpu_flags        # prints them, space-separated (what tpu_pod.sh reads)

They let collectives overlap compute (from MaxText's sets in benchmarks/xla_flags_library.py, read
2026-12): FSDP's weight gathers and the gradients' reductions run asynchronously inside the neighbouring
computation, and the DCN all-reduces of several slices are pipelined. They change when bytes move, not how
many (measured: the same collective bytes as without them). Every flag is accepted by libtpu 0.0.42.1 (an
unknown one aborts the process at startup; tests/test_tpu_compile.py compiles with all of them).
"""
from __future__ import annotations

# name -> value, with why. Booleans are written "true"/"false" as libtpu expects.
TPU_FLAGS: dict[str, str] = {
    # Continuation fusion: a collective runs asynchronously inside the fusions of the loop around it,
    # overlapping their compute (FSDP's weight gathers, the gradients' all-reduces).
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_reduce": "true",
    "xla_tpu_overlap_compute_collective_tc": "true",  # overlap on the TensorCore itself
    # Data parallelism over the DCN (several slices): pipeline and optimise the gradient all-reduces.
    "xla_tpu_enable_data_parallel_all_reduce_opt": "true",
    "xla_tpu_data_parallel_opt_different_sized_ops": "true",
    # Reduce-scatter fusion (all-reduce + dynamic-slice -> reduce-scatter) for the gradients.
    "xla_tpu_use_minor_sharding_for_major_trivial_input": "true",
    "xla_tpu_relayout_group_size_threshold_for_reduce_scatter": "1",
    "xla_tpu_assign_all_reduce_scatter_layout": "true",
}
# Left out, measured: xla_enable_async_all_gather / _all_reduce / _collective_permute next to the fusion flags
# above made XLA copy a weight's gather into each of its consumers (stage 2 with 2 + 2 layers on v5p-32:
# 6.80 GiB of collectives per chip per step instead of 2.95 GiB, the same as without any flag). Their
# companions xla_tpu_enable_async_collective_fusion_multiple_steps and xla_tpu_enable_ag_backward_pipelining
# were only tried in that company and stay out with them.


def libtpu_init_args(flags: dict[str, str] | None = None) -> str:
    """'--name=value ...': the LIBTPU_INIT_ARGS of a TPU run."""
    return " ".join(f"--{k}={v}" for k, v in (TPU_FLAGS if flags is None else flags).items())


def compiler_options(flags: dict[str, str] | None = None) -> dict[str, str]:
    """The same flags as `jax.stages.Lowered.compile(compiler_options=...)` takes them (an unknown one raises)."""
    return dict(TPU_FLAGS if flags is None else flags)


if __name__ == "__main__":
    print(libtpu_init_args())
