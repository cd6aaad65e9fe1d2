r"""Will sampling fit? Compile one pipeline call for a TPU slice from any host and report per chip.

  python -m dual_diffusion.sample --dry_run --topology=v5e-8 --task=caption|t2i|vqa [--checkpoint=DIR]
      [--batch-size=8] [--image-size=512] [--text-length=N] [--steps=N] [--mesh_data=... --mesh_fsdp=...]

The networks are the checkpoint's architectures (no weight is read), else the release's: the
SD3-medium MM-DiT with D-DiT's text head (2.1B), the T5-XXL encoder (4.76B) and SD3's VAE;
parameters and compute in bfloat16. The call is `inference.pipelines.Pipeline`'s own (the
jitted function `sample` runs, via Pipeline.lower), on a mesh of the slice's chips, its
batch split over every chip. Without mesh flags two weight layouts are compiled: replicated
(data = every chip) and FSDP (fsdp = every chip). For each: the weights' bytes per chip,
then XLA's memory per chip against the chip's HBM, Pallas kernels, collectives and the
analytic FLOPs of the call with their time at peak (aot/compile_report.program_report, the
train step's report; flops.py counts the MM-DiT and T5 matmuls, not the VAE), and which
layout `sample` would pick on that slice (inference/sharded.choose_mesh). A layout that does
not fit is reported with what it needs; when none fits, one `error:` line (exit status 2).
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import jax
import numpy as np

from dual_diffusion.aot.compile_report import (DoesNotFit, _size, check_peak, compile_lowered, program_lines,
                                               program_report)
from dual_diffusion.aot.topology import TopologyError, slice_info, topology_devices
from dual_diffusion.cli import UsageError

TASKS = ("t2i", "caption", "vqa")
# T5's tokenizer: EOS, and <extra_id_0>, D-DiT's mask (only their values enter the program).
RELEASE_TOKEN_IDS = SimpleNamespace(eos_id=1, mask_id=32099)


def release_configs() -> dict:
    """The release's networks: SD3-medium MM-DiT + D-DiT text head, T5-XXL encoder, SD3 VAE."""
    from dual_diffusion.models.configs import MMDiTConfig, T5Config, VAEConfig

    return {"transformer": MMDiTConfig(), "text_encoder": T5Config(), "vae": VAEConfig()}


def shard_bytes(states, shardings) -> int:
    """Bytes one chip holds of abstract states under their shardings."""
    from flax import nnx

    leaves = jax.tree.leaves(states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    total = 0
    for leaf, sharding in zip(leaves, jax.tree.leaves(shardings)):
        value = leaf.get_value()
        total += math.prod(sharding.shard_shape(value.shape)) * np.dtype(value.dtype).itemsize
    return int(total)


def _abstract_on(mesh, configs: dict, runtime):
    """(graphdefs, states of ShapeDtypeStructs placed by the logical rules, weight bytes per chip)."""
    from flax import nnx

    from dual_diffusion.checkpoints.pretrained import abstract_state
    from dual_diffusion.sharding import DEFAULT_RULES, state_shardings

    graphdefs, states, per_chip = {}, {}, 0
    for name, cfg in configs.items():
        graphdefs[name], state = abstract_state(name, cfg, runtime)
        shardings = state_shardings(state, mesh, DEFAULT_RULES)
        per_chip += shard_bytes(state, shardings)
        states[name] = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape,
                                                                                v.get_value().dtype, sharding=s)),
                                    state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdefs, states, per_chip


def _analytic_flops(task: str, configs: dict, batch: int, image_size: int, length: int, opts) -> int:
    """FLOPs of one call (flops.py): t2i all its steps (CFG doubles the rows); text at most steps + 1
    predictions (prediction caching skips steps that changed nothing; one final fill)."""
    from dual_diffusion import flops

    mmdit, t5, vae = configs["transformer"], configs["text_encoder"], configs.get("vae")
    side = image_size // (2 ** (len(vae.block_out_channels) - 1) if vae else 1)
    if task == "t2i":
        return flops.text_to_image(mmdit, t5, batch, side, length, opts.steps, opts.cfg_scale != 1.0)
    return flops.image_to_text(mmdit, t5, batch, side, length, opts.steps + 1)


def compile_layout(task: str, configs: dict, runtime, devices, info, mesh_sizes: tuple[int, int, int],
                   batch: int, image_size: int, text_length: int, opts, token_ids=RELEASE_TOKEN_IDS) -> dict:
    """Compiles one call of `task` on a (data, fsdp, tensor) mesh of `devices`; the report (raises DoesNotFit)."""
    from dual_diffusion.inference.pipelines import Pipeline
    from dual_diffusion.sharding import make_mesh

    mesh = make_mesh(*mesh_sizes, devices=devices)
    graphdefs, states, weights = _abstract_on(mesh, configs, runtime)
    vae = configs.get("vae")
    pipe = Pipeline(graphdefs, token_ids, text_length=text_length, image_size=image_size, mesh=mesh,
                    vae_shift=vae.shift_factor if vae else 0.0, vae_scale=vae.scaling_factor if vae else 1.0)
    batch = -(-batch // pipe.batch_multiple) * pipe.batch_multiple
    chip = info.chip
    head = dict(mesh=dict(zip(("data", "fsdp", "tensor"), mesh_sizes)), batch_size=batch, weights_per_chip=weights)
    try:
        compiled, seconds = compile_lowered(pipe.lower(task, states, batch, opts), chip.hbm_usable_bytes)
        flops_total = _analytic_flops(task, configs, batch, image_size, text_length, opts)
        report = dict(head, **program_report(compiled, len(devices), chip, flops_total // len(devices)),
                      compile_seconds=round(seconds, 2))
        check_peak(report)
    except DoesNotFit as e:
        e.report = dict(head, fits=False, needed_bytes=e.needed, available_bytes=e.available, detail=e.detail)
        raise
    return dict(report, fits=True)


def run(args) -> dict:
    """`sample --dry_run --topology=NAME --task=...`: prints each layout's lines; returns the JSON report."""
    from dual_diffusion.inference import sharded
    from dual_diffusion.inference.pipelines import ImageOptions
    from dual_diffusion.models.configs import Runtime
    from dual_diffusion.sample import text_options

    if not (args.topology and args.dry_run):
        raise UsageError("--dry_run and --topology=NAME (a Cloud TPU slice such as v5e-8) go together: the dry "
                         "run compiles for a slice without running")
    if args.task not in TASKS:
        raise UsageError(f"--dry_run compiles --task={'|'.join(TASKS)}, not {args.task}")
    try:
        info = slice_info(args.topology)
        devices = topology_devices(args.topology)
    except TopologyError as e:
        raise UsageError(str(e)) from None
    runtime = Runtime(dtype="bfloat16", param_dtype="bfloat16")
    configs, token_ids, source = release_configs(), RELEASE_TOKEN_IDS, "the release's architecture"
    if args.checkpoint:
        from dual_diffusion.checkpoints.pretrained import read_configs

        try:
            configs, source = read_configs(args.checkpoint), args.checkpoint
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"cannot read the architecture of --checkpoint={args.checkpoint}: {e}") from None
    image_size = args.image_size or 512
    if args.task == "t2i":
        length = args.text_length or 256
        opts = ImageOptions(steps=args.steps or 28, cfg_scale=args.cfg, shift=args.shift, grid=args.grid)
    else:
        length = args.text_length or 128
        opts = text_options(args)
    from dual_diffusion.checkpoints.pretrained import abstract_state, state_bytes

    total = state_bytes([abstract_state(n, c, runtime)[1] for n, c in configs.items()])
    chips, hbm = len(devices), info.chip.hbm_usable_bytes
    flags = dict(data=args.mesh_data, fsdp=args.mesh_fsdp, tensor=args.mesh_tensor)
    try:
        default = sharded.choose_mesh(total, chips, hbm, **flags)
    except sharded.MeshError as e:
        if any(v is not None for v in flags.values()):
            raise UsageError(str(e)) from None
        default = None
    if any(v is not None for v in flags.values()):
        layouts = [(default.data, default.fsdp, default.tensor)]
    else:
        layouts = [(chips, 1, 1), (1, chips, 1)]
    print(f"{args.task} on {args.topology} ({chips} x {devices[0].device_kind}): {source}, {_size(total)} of "
          f"bfloat16 weights, {image_size} px, {length}-token rows, batch {args.batch_size}; "
          + (f"`sample` would use data={default.data} fsdp={default.fsdp} tensor={default.tensor} ({default.note})"
             if default else "`sample` finds no layout whose weights fit"), flush=True)
    results = []
    for sizes in layouts:
        try:
            report = compile_layout(args.task, configs, runtime, devices, info, sizes, args.batch_size, image_size,
                                    length, opts, token_ids)
            lines = [f"compiled in {report['compile_seconds']:.1f} s"] + program_lines(report, "call")
        except DoesNotFit as e:
            report = e.report
            lines = [f"does not fit: needs {_size(e.needed)} of {_size(e.available)} per chip. XLA: {e.detail}"]
        results.append(report)
        print(f"mesh {report['mesh']}, batch {report['batch_size']}: weights {_size(report['weights_per_chip'])} "
              "per chip\n  " + "\n  ".join(lines), flush=True)
    if not any(r["fits"] for r in results):
        need = "; ".join(f"{r['mesh']}: needs {_size(r['needed_bytes'])}" for r in results)
        raise UsageError(f"{args.task} does not fit {args.topology} ({_size(hbm)} usable per chip): {need}; lower "
                         "--batch-size, shard the weights (--mesh_fsdp / --mesh_tensor) or take a larger slice")
    return {"topology": args.topology, "libtpu_topology": info.topology, "task": args.task, "chips": chips,
            "device_kind": devices[0].device_kind, "architecture": source, "dtype": "bfloat16",
            "weights_bytes": total, "image_size": image_size, "text_length": length,
            "options": dataclasses.asdict(opts),
            "default_mesh": dataclasses.asdict(default) if default else None, "layouts": results}
