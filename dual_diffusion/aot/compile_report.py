r"""Will it fit? Compile the real train step for a TPU slice from any host and report per chip.

  python -m dual_diffusion.train --config=configs/stage2.py --dry_run --topology=v5p-64 [--find_max_batch]

`compile_for_devices(config, devices)` builds the step as train.py does (mesh over
`devices`, plan, loss, abstract batch, make_train_step), compiles it on abstract
inputs and returns a dict: bytes per chip of params / optimizer / EMA / frozen, XLA's
argument / output / temporary / peak bytes against the chip's HBM, the number of
Pallas kernels, the bytes collectives move per step (loops counted by trip count),
the ICI time they imply, the analytic FLOPs per chip and the compile seconds.
A step that does not fit raises DoesNotFit; the CLI prints it as one `error:` line
naming the knobs, exit status 2.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time

from dual_diffusion.aot.hlo_collectives import COLLECTIVE_KINDS, collective_bytes, count_pallas_kernels
from dual_diffusion.aot.topology import GiB, Slice, TopologyError, slice_info, topology_devices


# --------------------------------------------------------------------------- any program: compile, measure
def compile_lowered(lowered, hbm_limit: int | None):
    """(compiled, seconds) of a jax `Lowered`; XLA's out-of-memory error becomes DoesNotFit."""
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:
        oom = _xla_oom(str(e), hbm_limit)
        if oom is None:
            raise
        raise oom from None
    return compiled, time.perf_counter() - t0


def program_report(compiled, chips: int, chip=None, analytic_flops_per_chip: int = 0) -> dict:
    """Per chip: XLA's memory (argument / output / temporaries / peak) against the chip's HBM, Pallas
    kernels, collective bytes (and their ICI time), FLOPs (analytic, and XLA's cost analysis) and their
    time at peak. `chip`: an aot.topology.Chip, or None (no HBM / ICI / peak figures)."""
    mem = compiled.memory_analysis()
    xla = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp",
                                                                          "generated_code")}
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    if peak:
        xla["peak"], xla["peak_source"] = peak, "peak_memory_in_bytes"
    else:
        xla["peak"] = xla["argument"] + xla["output"] + xla["temp"] - xla["alias"]
        xla["peak_source"] = "argument+output+temp-alias"
    hlo = compiled.as_text()
    hbm = chip.hbm_usable_bytes if chip else None
    report = dict(xla_memory=xla, memory_source="compiled", hbm_bytes=chip.hbm_bytes if chip else None,
                  hbm_usable_bytes=hbm, headroom_bytes=hbm - xla["peak"] if hbm else None,
                  pallas_kernels=count_pallas_kernels(hlo), collectives=collective_bytes(hlo, chips),
                  analytic_flops_per_chip=int(analytic_flops_per_chip))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    report["xla_cost_flops_per_chip"] = float((cost or {}).get("flops", 0.0))  # counts a scanned layer once
    if chip:
        report["ici_seconds"] = report["collectives"]["total_wire_bytes"] / chip.ici_bytes_per_s
        report["compute_seconds_at_peak"] = report["analytic_flops_per_chip"] / chip.peak_bf16_flops
    return report


def check_peak(report: dict) -> None:
    """DoesNotFit when a program_report's peak exceeds the chip's usable HBM."""
    peak, hbm = report["xla_memory"]["peak"], report["hbm_usable_bytes"]
    if hbm and peak > hbm:
        raise DoesNotFit(peak, hbm, f"peak {peak / GiB:.2f} GiB > usable HBM {hbm / GiB:.2f} GiB")


# --------------------------------------------------------------------------- compile the train step
class DoesNotFit(Exception):
    """The step needs more HBM per chip than the chip has (compile error or peak > limit)."""

    def __init__(self, needed: int | None, available: int, detail: str):
        super().__init__(detail)
        self.needed, self.available, self.detail = needed, available, detail


def _xla_oom(message: str, hbm_limit: int) -> DoesNotFit | None:
    """XLA's RESOURCE_EXHAUSTED error -> DoesNotFit with the sizes it names ("... (99.30G) ... (95.74G)")."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    line = next((ln for ln in message.splitlines() if "memory" in ln.lower()), message.splitlines()[0])
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}  # XLA prints binary units
    sizes = [int(float(v) * units[u]) for v, u in re.findall(r"([\d.]+)([KMGT])i?B?\b", line)]
    needed = sizes[0] if sizes else None
    available = sizes[1] if len(sizes) > 1 else hbm_limit
    if m := re.search(r"[Uu]sed ([\d.]+)([KMGT])\S* of ([\d.]+)([KMGT])", line):
        needed = int(float(m.group(1)) * units[m.group(2)])
        available = int(float(m.group(3)) * units[m.group(4)])
    return DoesNotFit(needed, available, line.strip())


def batch_unit(config, mesh_shape: dict) -> int:
    """Global batch sizes must be multiples of this: batch shards (the `batch` rule's axes) x microbatches."""
    axes = dict(tuple(r) for r in config.sharding.rules).get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh_shape.get(a, 1) for a in axes) * max(int(config.train.microbatches), 1)


def build_step(config, devices):
    """(mesh, plan, train_step, abstract_batch) as train.py's dry run builds them, over `devices`.

    The model .. step part is train.py's own (plan_io.build_step). `config` is resolved in place (vocab
    sizes of -1 as a dry run sizes them: no tokenizer or checkpoint is loaded for a compile).
    """
    from dual_diffusion import sharding
    from dual_diffusion.training import config_check, plan_io

    config_check.check_config(config, len(devices), dry_run=True)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    tokenizer = plan_io.get_tokenizer(config, None, dry_run=True)
    plan_io.resolve_vocab(config, tokenizer, None, dry_run=True)
    mask_id, eos_id = plan_io.special_ids(config, tokenizer)
    built = plan_io.build_step(config, mesh, rules, mask_id, eos_id)
    return mesh, built.plan, built.train_step, built.abstract_batch


def analytic_flops(config, plan) -> int:
    """flops.train_step for the global batch (T5 forward only, no VAE encoder: see flops.py)."""
    from dual_diffusion import flops
    from dual_diffusion.models.configs import MMDiTConfig, T5Config

    px = int(config.data.image_size)
    down = 2 ** (len(config.model.vae.block_out_channels) - 1) if config.model.latent_space == "vae" else 1
    return flops.train_step(MMDiTConfig.from_dict(plan.arch["transformer"]),
                            T5Config.from_dict(plan.arch["text_encoder"]), int(config.train.batch_size), px // down,
                            int(config.data.text_length))


def compile_for_devices(config, devices, info: Slice | None = None) -> dict:
    """Compiles the train step for `devices` (e.g. topology_devices("v5e-8")) and reports per chip.

    `info` gives the chip's HBM / ICI / peak figures (needed for TPU devices; from the slice name).
    Raises DoesNotFit when XLA runs out of HBM or the peak exceeds the chip's usable HBM.
    """
    from dual_diffusion.training import plan_io

    config = config.copy_and_resolve_references()
    mesh, plan, train_step, abstract_batch = build_step(config, devices)
    report = plan_io.dry_run_report(plan, train_step, abstract_batch, mesh)
    chip = info.chip if info else None
    hbm = chip.hbm_usable_bytes if chip else None
    compiled, seconds = compile_lowered(train_step.lower(plan.abstract_state, plan.abstract_frozen, abstract_batch),
                                        hbm)
    flops_total = analytic_flops(config, plan)
    report.update(
        topology=info.name if info else None, libtpu_topology=info.topology if info else None, chips=len(devices),
        platform=devices[0].platform, device_kind=devices[0].device_kind,
        batch_size=int(config.train.batch_size), microbatches=int(config.train.microbatches),
        batch_unit=batch_unit(config, dict(mesh.shape)), image_size=int(config.data.image_size),
        text_length=int(config.data.text_length), remat_policy=config.runtime.remat_policy,
        attention_impl=config.runtime.attention_impl)
    report.update(program_report(compiled, len(devices), chip, flops_total // len(devices)),
                  compile_seconds=round(seconds, 2))
    check_peak(report)
    return report


# --------------------------------------------------------------------------- command line (train.py --topology)
def _size(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.2f} GiB" if abs(n) >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def not_fit_message(name: str, err: DoesNotFit, config) -> str:
    """One line: by how much, and which knobs lower the memory per chip."""
    need = (f"needs {_size(err.needed)} of {_size(err.available)} per chip (+{_size(err.needed - err.available)})"
            if err.needed else f"needs more than {_size(err.available)} per chip")
    mesh = ", ".join(f"{k}={config.mesh[k]}" for k in ("data", "fsdp", "tensor"))
    remat = ("" if config.runtime.remat_policy == "full" else
             f", set --config.runtime.remat_policy=full (now {config.runtime.remat_policy})")
    return (f"does not fit {name}: {need}; lower --config.train.batch_size (now {config.train.batch_size}) or raise "
            f"--config.train.microbatches (now {config.train.microbatches}){remat}, or shard the weights with "
            f"--config.mesh.fsdp / --config.mesh.tensor (now {mesh}). XLA: {err.detail}")


def describe(report: dict) -> str:
    """The human-readable lines of a report (the JSON line follows them)."""
    b = report["bytes_per_device"]
    lines = [f"compiled for {report['topology'] or report['platform']} ({report['chips']} x {report['device_kind']}"
             f"{', libtpu ' + report['libtpu_topology'] if report['libtpu_topology'] else ''}) in "
             f"{report['compile_seconds']:.1f} s",
             f"mesh {report['mesh']}; batch {report['batch_size']} per half x {report['microbatches']} microbatch(es), "
             f"{report['image_size']} px, {report['text_length']} tokens, remat {report['remat_policy']}, "
             f"attention {report['attention_impl']}",
             "per chip (shapes): " + ", ".join(f"{k} {_size(v)}" for k, v in b.items())]
    return "\n".join(lines + program_lines(report, "step"))


def program_lines(report: dict, per: str) -> list[str]:
    """The lines of a program_report: memory, HBM headroom, kernels, collectives and FLOPs per `per` (a call)."""
    x, c = report["xla_memory"], report["collectives"]
    lines = [f"per chip (XLA): arguments {_size(x['argument'])}, outputs {_size(x['output'])}, temporaries "
             f"{_size(x['temp'])}, peak {_size(x['peak'])} ({x['peak_source']})"]
    if report["hbm_usable_bytes"]:
        lines.append(f"HBM per chip {_size(report['hbm_usable_bytes'])} usable ({_size(report['hbm_bytes'])} "
                     f"nominal): headroom {_size(report['headroom_bytes'])}")
    lines.append(f"Pallas kernels in the program: {report['pallas_kernels']}")
    kinds = ", ".join(f"{k} {_size(c[k]['bytes'])} ({c[k]['ops']} ops)" for k in COLLECTIVE_KINDS if c[k]["ops"])
    lines.append(f"collectives per {per} per chip: {kinds or 'none'}; sent {_size(c['total_wire_bytes'])}"
                 + (f" = {_ms(report['ici_seconds'])} of ICI" if "ici_seconds" in report else "")
                 + (f" ({c['unknown_trip_counts']} loops of unknown trip count counted once)"
                    if c["unknown_trip_counts"] else ""))
    lines.append(f"analytic FLOPs per chip: {report['analytic_flops_per_chip']:.3e}"
                 + (f" = {_ms(report['compute_seconds_at_peak'])} at peak bf16"
                    if "compute_seconds_at_peak" in report else "")
                 + f" (XLA cost analysis: {report['xla_cost_flops_per_chip']:.3e}, a scanned layer counted once)")
    return lines


def find_max_batch(config, devices, info: Slice, log=print, limit: int = 1 << 16) -> tuple[int | None, list[dict]]:
    """Largest global batch per half that fits, over multiples of batch_unit: doubling, then bisection.

    Returns (batch or None, tries: [{batch_size, fits, peak_bytes or needed_bytes}]); the doubling
    stops at `limit` pairs per half (the answer is then "at least" that).
    """
    from dual_diffusion.sharding import make_mesh

    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    unit = batch_unit(config, dict(mesh.shape))
    tries, fits = [], {}

    def attempt(k: int) -> bool:
        c = config.copy_and_resolve_references()
        c.train.batch_size = k * unit
        try:
            peak = compile_for_devices(c, devices, info)["xla_memory"]["peak"]
            row = {"batch_size": k * unit, "fits": True, "peak_bytes": peak}
        except DoesNotFit as e:
            row = {"batch_size": k * unit, "fits": False, "needed_bytes": e.needed}
        tries.append(row)
        fits[k] = row["fits"]
        log(f"batch {row['batch_size']}: " + (f"fits, peak {_size(row['peak_bytes'])}" if row["fits"]
                                               else f"does not fit (needs {_size(row['needed_bytes'])})"))
        return row["fits"]

    k = max(int(config.train.batch_size) // unit, 1)
    if attempt(k):
        lo, hi = k, None
        while hi is None:
            if 2 * lo * unit > limit:
                return lo * unit, tries
            hi = None if attempt(2 * lo) else 2 * lo
            lo = 2 * lo if hi is None else lo
    else:
        hi, lo = k, None
        while lo is None and hi > 1:
            lo = hi // 2 if attempt(hi // 2) else None
            hi = hi // 2 if lo is None else hi
        if lo is None:
            return None, tries
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
    return lo * unit, tries


def main(config, topology: str | None, *, dry_run: bool, find_max: bool = False) -> int:
    """`train --dry_run --topology=NAME [--find_max_batch]`: prints the report (or the search) and a JSON line.

    Exit status 0; 2 with one `error: ...` line on stderr for a bad flag or name, a missing libtpu,
    an invalid config, or a step that does not fit.
    """
    from dual_diffusion.training.config_check import ConfigError

    def fail(msg: str) -> int:
        print("error: " + " ".join(str(msg).split()), file=sys.stderr)
        return 2

    if not topology:
        return fail("--find_max_batch needs --topology=NAME (a Cloud TPU slice such as v5p-64)")
    if not dry_run:
        return fail(f"--topology={topology} compiles without running: add --dry_run")
    try:
        info = slice_info(topology)
        devices = topology_devices(topology)
        if find_max:
            best, tries = find_max_batch(config, devices, info, log=lambda line: print(line, flush=True))
            if best is None:
                return fail(f"no batch fits {topology}: even {tries[-1]['batch_size']} per half needs "
                            f"{_size(tries[-1]['needed_bytes'])} of {_size(info.chip.hbm_usable_bytes)} per chip; "
                            f"raise --config.train.microbatches or set --config.runtime.remat_policy=full")
            print(f"largest global batch per half that fits {topology}: {best} ({best / len(devices):g} per chip)")
            print(json.dumps({"topology": topology, "max_batch_size": best, "per_chip": best / len(devices),
                              "tries": tries}))
            return 0
        report = compile_for_devices(config, devices, info)
    except DoesNotFit as e:
        return fail(not_fit_message(topology, e, config))
    except ConfigError as e:
        return fail(f"invalid config: {e.one_line()}")
    except (TopologyError, ValueError, KeyError) as e:
        return fail(e)
    print(describe(report))
    print(json.dumps(report))
    return 0
