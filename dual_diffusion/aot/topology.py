"""Cloud TPU slice names -> libtpu topologies, chip figures, and abstract devices to compile for.

`topology_devices("v5p-64")` returns the 32 TPU devices of that slice on any
host (a CPU-only one included) once libtpu is installed (`pip install -e ".[tpu]"`);
`jit(...).lower(...).compile()` over a mesh of them gives XLA's real TPU program,
memory analysis and out-of-memory errors (aot/compile_report.py).

Cloud names count TensorCores for v4 and v5p (two per chip, megacore: v5p-8 is
4 chips) and chips for v5e / v5litepod and v6e. libtpu names count chips
(`v5:2x4x4` is 32 chips). Shapes are the default slice shapes of the Cloud TPU
docs (docs.cloud.google.com/tpu/docs/{v4,v5p,v5e,v6e}); every one below was
checked to give a topology with libtpu 0.0.42.1 (tests/test_tpu_compile.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. Figures per chip, from the Cloud TPU system-architecture pages.

    hbm_bytes: the documented HBM; hbm_usable_bytes: the limit XLA checks programs against, read
      from its out-of-memory message with libtpu 0.0.42.1 ("... exceeds available HBM (95.74G)";
      G = GiB): 30.75 (v4), 95.74 (v5p), 15.75 (v5e), 31.25 (v6e).
    ici_bytes_per_s: one direction, all links of the chip together (the docs give the
      bidirectional figure: v4 2x300, v5e 400, v5p 1200, v6e 800 GB/s).
    dcn_bytes_per_s: data-center network (between slices) per chip, one direction; None where the
      Cloud TPU page gives no figure (v4). v5p: "Data center network (DCN) bandwidth per chip 50 Gbps"
      (docs.cloud.google.com/tpu/docs/v5p; 4 chips per host = 200 Gbps per host). v5e: "Per-host NIC
      configuration 2 x 100 Gbps" for 8 chips per host (docs.cloud.google.com/tpu/docs/v5e) = 25 Gbps
      per chip. v6e: 4 x 200 Gbps per host of 8 chips (docs.cloud.google.com/tpu/docs/v6e) = 100 Gbps.
    """

    generation: str  # Cloud name prefix
    libtpu_prefix: str  # libtpu topology prefix
    chip_config: str  # "megacore": one device per chip spanning both TensorCores
    cores_per_chip: int  # TensorCores a Cloud name counts per chip
    hbm_bytes: int
    hbm_usable_bytes: int
    ici_bytes_per_s: float
    peak_bf16_flops: float
    shapes: dict[int, str]  # chips -> slice shape
    dcn_bytes_per_s: float | None = None


_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
       512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

# ICI, one direction: v4, 6 links x 400 Gbps (Jouppi et al. 2023, "TPU v4: an optically reconfigurable
# supercomputer"; 2400 Gbps = 3.0e11 B/s); v5e 1600 Gbps (400 GB/s bidirectional); v5p 4800 Gbps
# (1200 GB/s bidirectional); v6e 800 GB/s bidirectional. Peak bf16: 275, 197, 459, 918 TFLOP/s.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "v4", "megacore", 2, 32 * GiB, int(30.75 * GiB), 3.0e11, 275e12,
               {**_3D, 4096: "16x16x16"}),
    "v5p": Chip("v5p", "v5", "megacore", 2, 95 * GiB, int(95.74 * GiB), 6.0e11, 459e12,
                {**_3D, 4096: "16x16x16", 6144: "16x16x24"}, dcn_bytes_per_s=50e9 / 8),
    "v5e": Chip("v5e", "v5e", "default", 1, 16 * GiB, int(15.75 * GiB), 2.0e11, 197e12, _2D,
                dcn_bytes_per_s=25e9 / 8),
    "v6e": Chip("v6e", "v6e", "default", 1, 32 * GiB, int(31.25 * GiB), 4.0e11, 918e12, _2D,
                dcn_bytes_per_s=100e9 / 8),
}
ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # the name asked for, e.g. "v5p-64", or "2xv5p-64" for two such slices
    chip: Chip
    num_chips: int  # chips of one slice
    topology: str  # libtpu name of one slice, e.g. "v5:2x4x4"
    chips_per_host_bounds: tuple[int, int, int]
    num_slices: int = 1  # slices joined by the data-center network (libtpu's num_slices)

    @property
    def total_chips(self) -> int:
        return self.num_chips * self.num_slices


class TopologyError(ValueError):
    """A slice name libtpu cannot give, or libtpu missing: the message is one line for the user."""


def valid_names() -> list[str]:
    """Every Cloud name this module maps, e.g. ['v4-8', ..., 'v5litepod-256', 'v6e-1', ...]."""
    out = []
    for gen, chip in CHIPS.items():
        prefixes = [gen] + [a for a, g in ALIASES.items() if g == gen]
        out += [f"{p}-{n * chip.cores_per_chip}" for p in prefixes for n in chip.shapes]
    return out


def slice_info(name: str) -> Slice:
    """'v5p-64' -> Slice(num_chips=32, topology='v5:2x4x4', ...); 'NxNAME' is N such slices joined by the
    data-center network (multi-slice); TopologyError listing valid names."""
    slices, sep, single = name.strip().lower().partition("x")
    if not (sep and slices.isdigit() and single.startswith("v")):  # no "N x" prefix ("v5p-64")
        slices, single = "1", name.strip().lower()
    gen, _, count = single.rpartition("-")
    chip = CHIPS.get(ALIASES.get(gen, gen))
    chips = int(count) // chip.cores_per_chip if chip and count.isdigit() else None
    if chip is None or chips not in chip.shapes or int(count) % chip.cores_per_chip or int(slices) < 1:
        raise TopologyError(f"unknown TPU slice {name!r}; expected one of: {', '.join(valid_names())} "
                            "(or N x one of them for N slices, e.g. 2xv5p-64)")
    shape = chip.shapes[chips]
    dims = [int(d) for d in shape.split("x")]
    if len(dims) == 3:  # v4 / v5p hosts hold a 2x2x1 tray of chips
        bounds = (min(dims[0], 2), min(dims[1], 2), 1)
    else:  # v5e / v6e hosts hold up to 8 chips (2x4)
        bounds = (min(dims[0], 2), min(dims[1], 4), 1)
    return Slice(name, chip, chips, f"{chip.libtpu_prefix}:{shape}", bounds, int(slices))


def _libtpu_hint() -> str:
    import jax
    return f'pip install -e ".[tpu]" (or pip install "jax[tpu]=={jax.__version__}")'


def topology_devices(name: str) -> list:
    """The TPU devices of slice `name` (abstract: compile only), in libtpu's order.

    Raises TopologyError (one line) for an unknown name or when libtpu is not installed.
    """
    info = slice_info(name)
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(f"--topology={name} compiles with libtpu, which is not installed: {_libtpu_hint()}")
    # On a host that is not a TPU VM libtpu looks for the VM's metadata and prints warnings; these
    # say there is none to find. Several processes may load libtpu at once (tests, a second compile).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{info.chip.generation}-{info.num_chips * info.chip.cores_per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=info.topology, platform="tpu",
                                            chip_config_name=info.chip.chip_config,
                                            chips_per_host_bounds=info.chips_per_host_bounds,
                                            num_slices=info.num_slices)
    except Exception as e:  # libtpu's errors are multi-line and name its own C++ files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"libtpu cannot make topology {info.topology!r} for {name}: {first} "
                            f"(libtpu must match jax: {_libtpu_hint()})") from None
    devices = list(desc.devices)
    if len(devices) != info.total_chips:
        raise TopologyError(f"libtpu gave {len(devices)} devices for {name} ({info.topology}); expected "
                            f"{info.total_chips}")
    return devices


def describe(info: Slice) -> str:
    c = info.chip
    slices = f"{info.num_slices} slices of " if info.num_slices > 1 else ""
    return (f"{info.name}: {slices}{info.num_chips} chips, libtpu {info.topology} ({c.chip_config}), "
            f"HBM {c.hbm_bytes / GiB:.2f} GiB per chip ({c.hbm_usable_bytes / GiB:.2f} usable), "
            f"ICI {c.ici_bytes_per_s / 1e9:.0f} GB/s per direction, peak bf16 {c.peak_bf16_flops / 1e12:.0f} TFLOP/s")
