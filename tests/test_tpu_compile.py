"""Compiling for a TPU slice from this host (aot/topology.py, compile_report.py, hlo_collectives.py).

Tests marked `tpu` need libtpu (`pip install -e ".[tpu]"`); without it they skip, unless
DD_REQUIRE_LIBTPU=1 (CI), where they fail.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dual_diffusion import flops
from dual_diffusion.models.configs import MMDiTConfig, T5Config
from dual_diffusion.aot import compile_report, topology
from dual_diffusion.aot.hlo_collectives import collective_bytes, count_pallas_kernels, shape_bytes

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3


@pytest.fixture(scope="module")
def libtpu():
    if importlib.util.find_spec("libtpu") is None:
        if os.environ.get("DD_REQUIRE_LIBTPU") == "1":
            pytest.fail("libtpu is not installed but DD_REQUIRE_LIBTPU=1: pip install -e '.[tpu]'")
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]' to compile for TPU topologies)")


# --------------------------------------------------------------------------- slice names
EXPECTED = {"v5p-8": ("v5:2x2x1", 4), "v5p-64": ("v5:2x4x4", 32), "v5p-512": ("v5:4x8x8", 256),
            "v4-8": ("v4:2x2x1", 4), "v4-16": ("v4:2x2x2", 8), "v5e-8": ("v5e:2x4", 8),
            "v5litepod-16": ("v5e:4x4", 16), "v6e-8": ("v6e:2x4", 8), "v6e-256": ("v6e:16x16", 256)}


def test_cloud_names_map_to_libtpu_topologies():
    for name, (libtpu_name, chips) in EXPECTED.items():
        info = topology.slice_info(name)
        assert (info.topology, info.num_chips) == (libtpu_name, chips), name
    assert topology.slice_info("v5p-8").chip.hbm_bytes == 95 * GiB
    assert topology.slice_info("v4-8").chip.chip_config == "megacore"


@pytest.mark.parametrize("name", ["v5p-7", "v5p-9", "v7-8", "v5e-3", "tpu", "v4-8x"])
def test_unknown_slice_name_lists_valid_ones(name):
    with pytest.raises(topology.TopologyError, match=r"unknown TPU slice .*expected one of: v4-8, v4-16"):
        topology.slice_info(name)


def test_missing_libtpu_says_what_to_install(monkeypatch):
    monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(topology.TopologyError, match=r'libtpu, which is not installed: pip install -e "\.\[tpu\]"'):
        topology.topology_devices("v5e-8")


def test_every_listed_slice_gives_its_devices(libtpu):
    kinds = {"v4": "TPU v4", "v5p": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}
    for name in topology.valid_names():
        info = topology.slice_info(name)
        devices = topology.topology_devices(name)
        assert len(devices) == info.num_chips, name
        assert {d.device_kind for d in devices} == {kinds[info.chip.generation]}, name


# --------------------------------------------------------------------------- HLO collectives
def test_hlo_text_shapes_groups_and_kernels():
    assert shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}") == 2048
    assert shape_bytes("(f32[4]{0}, s8[3,2]{1,0}, pred[])") == 16 + 6 + 1
    hlo = """HloModule m

ENTRY %main (p: f32[16]) -> f32[64] {
  %p = f32[16]{0} parameter(0)
  %k = f32[16]{0} custom-call(%p), custom_call_target="tpu_custom_call", backend_config={"meta":"{\"a\": 1,
}}, metadata={op_name="pallas_call"}
  %ag = f32[64]{0} all-gather(%k), replica_groups=[2,4]<=[8], dimensions={0}
  %rs = f32[4]{0} reduce-scatter(%ag), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}
  %ar = f32[64]{0} all-reduce(%ag), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %cp = f32[64]{0} collective-permute(%ar), source_target_pairs={{0,1},{1,0}}
}
"""
    c = collective_bytes(hlo, 8)  # a kernel's backend_config may hold a newline: the computation goes on
    assert count_pallas_kernels(hlo) == 1
    assert (c["all-gather"]["bytes"], c["all-gather"]["wire_bytes"]) == (256, 192)  # group of 4
    assert (c["reduce-scatter"]["bytes"], c["reduce-scatter"]["wire_bytes"]) == (32, 16)  # group of 2
    assert (c["all-reduce"]["bytes"], c["all-reduce"]["wire_bytes"]) == (256, 448)  # 2 x 7/8
    assert c["collective-permute"]["bytes"] == c["collective-permute"]["wire_bytes"] == 256
    assert c["total_bytes"] == 256 + 32 + 256 + 256


def test_hlo_collectives_split_by_slice_and_dtype():
    """Groups inside a slice are ICI, groups across slices DCN (iota with a transpose, mesh form, permute pairs)."""
    hlo = """HloModule m

ENTRY %main (p: f32[16]) -> bf16[64] {
  %p = f32[16]{0} parameter(0)
  %ag = f32[64]{0} all-gather(%p), replica_groups=[2,4]<=[8], dimensions={0}
  %ar = f32[64]{0} all-reduce(%ag), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  %ar2 = bf16[64]{0} all-reduce(%ar), replica_groups=mesh['x'=2,'y'=4] {'y'}, to_apply=%add
  ROOT %cp = bf16[64]{0} collective-permute(%ar2), source_target_pairs={{0,1},{3,4}}
}
"""
    assert collective_bytes(hlo, 8)["dcn_wire_bytes"] == 0  # no slices given: all ICI
    c = collective_bytes(hlo, 8, slice_of=[0, 0, 0, 0, 1, 1, 1, 1])
    assert c["all-gather"]["dcn_wire_bytes"] == 0 and c["all-gather"]["wire_bytes"] == 192
    assert c["all-reduce"]["by_dtype"] == {"f32": 256, "bf16": 192}  # {0,4},... x 2 x 1/2; groups of 4 x 2 x 3/4
    assert c["all-reduce"]["dcn_wire_bytes"] == 256  # the f32 one's groups {0,4}, {1,5}, ... cross; the mesh's do not
    assert (c["collective-permute"]["wire_bytes"], c["collective-permute"]["dcn_wire_bytes"]) == (128, 64)
    assert c["dcn_wire_bytes"] == 256 + 64 and c["ici_wire_bytes"] == c["total_wire_bytes"] - 320


def test_a_continuation_spread_over_a_loop_moves_its_buffer_once_and_dcn_sends_count():
    """TPU async collective fusion spreads one collective over steps of a loop (flag_start..flag_end in its
    backend_config): once per run of the loop, not per trip. Multi-slice programs move data between slices by
    megascale host-transfer sends: DCN."""
    cfg = lambda start: '"async_collective_fusion_config":{"flag_start":"%d","flag_end":"8"}' % start  # noqa: E731
    hlo = """HloModule m

%body (c: (s32[], f32[64])) -> (s32[], f32[64]) {
  %c = (s32[], f32[64]) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %x = f32[64] get-tuple-element(%c), index=1
  %spread = f32[64]{0} all-gather(%x), replica_groups=[1,4]<=[4], backend_config={CFG2}
  %each = f32[64]{0} all-gather(%spread), replica_groups=[1,4]<=[4], backend_config={CFGM}
  ROOT %t = (s32[], f32[64]) tuple(%i, %each)
}

%cond (c: (s32[], f32[64])) -> pred[] {
  %c = (s32[], f32[64]) parameter(0)
  ROOT %lt = pred[] compare(%i, %i), direction=LT
}

ENTRY %main (p: f32[64]) -> f32[64] {
  %p = f32[64]{0} parameter(0)
  %t0 = (s32[], f32[64]) tuple(%p, %p)
  %w = (s32[], f32[64]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"}}
  %tok = token[] after-all()
  %s = (bf16[16]{0}, u32[], token[]) send(%p, %tok), is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE",_xla_megascale_reduce_operation="SUM"}
  ROOT %r = f32[64]{0} get-tuple-element(%w), index=1
}
""".replace("CFG2", cfg(2)).replace("CFGM", cfg(-1))
    c = collective_bytes(hlo, 4, num_slices=2)
    assert c["all-gather"]["ops"] == 1 + 8 and c["all-gather"]["bytes"] == 9 * 256
    assert c["all-reduce"]["ops"] == 1 and c["all-reduce"]["bytes"] == 32  # bf16[16], not the tuple
    assert c["all-reduce"]["dcn_wire_bytes"] == c["dcn_wire_bytes"] == 32  # 2 x (2-1)/2 x 32


def _scanned_gather(devices, outer=3, inner=5, rows=8, width=128):
    """Compiled HLO of an all-gather inside a scan of `inner` inside a scan of `outer`, and its bytes per run."""
    n = len(devices)
    mesh = Mesh(np.array(devices), ("x",))

    def local(xs_OxIxRxW):
        def step(c, x):
            g = jax.lax.all_gather(c + x, "x", tiled=True)  # (n * rows, width): depends on the carry
            return c + jnp.tanh(g[::n] + g[1::n]), None

        def outer_step(c, xs):
            return jax.lax.scan(step, c, xs)[0], None

        return jax.lax.scan(outer_step, xs_OxIxRxW[0, 0] * 0, xs_OxIxRxW)[0]

    spec = P(None, None, "x")
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=P("x")))
    x = jax.ShapeDtypeStruct((outer, inner, n * rows, width), jnp.float32, sharding=NamedSharding(mesh, spec))
    return fn.lower(x).compile().as_text(), outer * inner * n * rows * width * 4


def test_collective_bytes_multiply_nested_scan_trip_counts():
    hlo, expected = _scanned_gather(jax.devices()[:8])
    assert hlo.count(" while(") == 2
    gather = collective_bytes(hlo, 8)["all-gather"]
    assert (gather["ops"], gather["bytes"]) == (15, expected)
    assert gather["wire_bytes"] == expected * 7 // 8
    # Without XLA's known_trip_count (TPU programs carry none) the count comes from the loop condition.
    stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\}', "", hlo)
    assert collective_bytes(stripped, 8)["all-gather"]["bytes"] == expected


def test_collective_bytes_on_a_tpu_program(libtpu):
    hlo, expected = _scanned_gather(topology.topology_devices("v5e-8"))
    c = collective_bytes(hlo, 8)
    assert (c["all-gather"]["ops"], c["all-gather"]["bytes"], c["unknown_trip_counts"]) == (15, expected, 0)


# --------------------------------------------------------------------------- the demo's train step on v5e-8
def _small_demo(**overrides):
    """configs/demo.py:full (32 px, 32 tokens) shrunk to compile in seconds (2 MM-DiT layers, 1 T5 layer),
    attention chosen by the mesh."""
    from configs import demo

    c = demo.get_config("full")
    c.model.transformer.num_layers = 2
    c.model.text_encoder.num_layers = 1
    c.train.batch_size = 16
    c.model.transformer.vocab_size = c.model.text_encoder.vocab_size = 512  # no tokenizer is trained here
    c.runtime.attention_impl = "auto"
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = c[node]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return c


@pytest.fixture(scope="module")
def demo_report(libtpu):
    devices = topology.topology_devices("v5e-8")
    return compile_report.compile_for_devices(_small_demo(), devices, topology.slice_info("v5e-8"))


def test_demo_compile_report(demo_report):
    r = demo_report
    assert (r["topology"], r["libtpu_topology"], r["chips"], r["device_kind"]) == ("v5e-8", "v5e:2x4", 8,
                                                                                 "TPU v5 lite")
    x = r["xla_memory"]
    assert x["peak_source"] == "peak_memory_in_bytes"
    assert x["argument"] > 0 and x["temp"] > 0 and x["peak"] >= x["temp"]
    assert r["hbm_usable_bytes"] == int(15.75 * GiB) and r["headroom_bytes"] == r["hbm_usable_bytes"] - x["peak"]
    b = r["bytes_per_device"]
    # data parallel (mesh data=8): every chip holds all params, their Adam moments and the EMA
    assert b["params"] > 0 and b["optimizer"] >= 2 * b["params"] and b["ema"] == b["params"]
    assert x["argument"] >= b["params"] + b["optimizer"] + b["ema"]
    # the gradients (float32, like the params) are all-reduced over the 8 chips once per step
    coll = r["collectives"]
    assert coll["all-reduce"]["bytes"] >= b["params"] and coll["unknown_trip_counts"] == 0
    assert r["ici_seconds"] == pytest.approx(coll["total_wire_bytes"] / 2.0e11)
    c = _small_demo()
    total = flops.train_step(MMDiTConfig.from_dict(c.model.transformer.to_dict()),
                             T5Config.from_dict(c.model.text_encoder.to_dict()), 16, 32, 32)  # pixel space: side 32
    assert r["analytic_flops_per_chip"] == total // 8
    assert r["compile_seconds"] > 0
    assert r["batch_unit"] == 8 and r["batch_size"] == 16
    lines = compile_report.describe(r).splitlines()
    assert lines[0].startswith("compiled for v5e-8 (8 x TPU v5 lite, libtpu v5e:2x4)")


def test_demo_compile_has_pallas_kernels(demo_report):
    """On a TPU mesh the MM-DiT's attention is Pallas splash attention (issue 11, item 2)."""
    assert demo_report["pallas_kernels"] > 0


@pytest.fixture(scope="module")
def two_slice_report(libtpu):
    """The demo (bf16, T5's mask row trains, FSDP inside each slice) on two v5p-8 slices joined by the DCN."""
    name = "2xv5p-8"
    config = _small_demo(**{"runtime.dtype": "bfloat16", "mesh.data": 1, "mesh.fsdp": -1,
                            "model.text_encoder_trainable": "mask_row", "runtime.attention_impl": "xla"})
    return compile_report.compile_for_devices(config, topology.topology_devices(name), topology.slice_info(name))


def test_two_slices_cross_the_dcn_only_to_reduce_gradients(two_slice_report):
    """Slices go on the data axis: FSDP's gathers stay on ICI and move bf16 kernels; the DCN carries the
    gradients' float32 reduction across the two slices, no more than the trainable float32 bytes each chip
    holds."""
    r = two_slice_report
    assert (r["num_slices"], r["chips"], r["mesh"]) == (2, 8, {"data": 2, "fsdp": 4, "tensor": 1})
    c = r["collectives"]
    assert c["dcn_wire_bytes"] > 0 and c["dcn_wire_bytes"] == sum(c[k]["dcn_wire_bytes"] for k in
                                                                  ("all-reduce", "reduce-scatter"))
    # the cross-slice sends are the chip's float32 gradient shards, in TPU tiles (8 x 128: 2% of padding
    # on this tiny model's shards)
    assert c["dcn_wire_bytes"] <= 1.03 * r["bytes_per_device"]["params"]
    gathers = c["all-gather"]["by_dtype"]
    # float32 gathers are what the networks read in float32 (biases, norm scales, small tables)
    assert gathers["bf16"] > 20 * gathers.get("f32", 0), gathers
    # gradients are reduced in float32 although the kernels were gathered in bf16 (layers.matmul)
    assert set(c["reduce-scatter"]["by_dtype"]) == {"f32"}, c["reduce-scatter"]
    assert c["all-reduce"]["by_dtype"]["f32"] > 20 * c["all-reduce"]["by_dtype"].get("bf16", 0), c["all-reduce"]
    assert r["dcn_seconds"] == pytest.approx(c["dcn_wire_bytes"] / (50e9 / 8))
    assert r["ici_seconds"] == pytest.approx(c["ici_wire_bytes"] / 6.0e11)
    assert any(line.strip().startswith("ICI ") and "DCN (groups across the 2 slices)" in line
               for line in compile_report.describe(r).splitlines())


def test_pod_xla_flags_are_accepted_by_this_libtpu(libtpu, demo_report):
    """The flags launch/tpu_pod.sh exports: the compile report compiles with them (demo_report), and libtpu
    takes them as LIBTPU_INIT_ARGS at start-up (an unknown flag aborts the process)."""
    from dual_diffusion.aot import tpu_flags

    assert demo_report["xla_flags"] == tpu_flags.compiler_options()
    flags = subprocess.run(["bash", "launch/tpu_pod.sh", "flags"], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout.strip()
    assert flags == tpu_flags.libtpu_init_args() and flags.count("--xla_") == len(tpu_flags.TPU_FLAGS)
    probe = ("from dual_diffusion.aot import topology; from dual_diffusion import sharding; import jax;"
             "mesh = sharding.make_mesh(1, -1, 1, devices=topology.topology_devices('v5e-8'));"
             "x = jax.ShapeDtypeStruct((64, 64), 'bfloat16', sharding=jax.NamedSharding(mesh, jax.P('fsdp')));"
             "print(jax.jit(lambda a: a @ a.T).lower(x).compile() is not None)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               LIBTPU_INIT_ARGS=flags)
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stderr[-2000:]


def test_oversized_batch_is_one_line_error_from_the_command_line(libtpu):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    r = subprocess.run([sys.executable, "-m", "dual_diffusion.train", "--config=configs/demo.py", "--dry_run",
                        "--topology=v5e-8", "--config.train.batch_size=262144",
                        "--config.model.transformer.num_layers=2", "--config.model.text_encoder.num_layers=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    err = r.stderr.strip()
    assert re.match(r"error: does not fit v5e-8: needs [\d.]+ GiB of 15\.75 GiB per chip \(\+[\d.]+ GiB\); ", err)
    assert "--config.train.batch_size (now 262144)" in err and "--config.train.microbatches (now 1)" in err


# --------------------------------------------------------------------------- command line, no compile
def test_command_line_errors_are_one_line(capsys):
    config = _small_demo()
    assert compile_report.main(config, "v5p-7", dry_run=True) == 2
    assert compile_report.main(config, "v5e-8", dry_run=False) == 2
    assert compile_report.main(config, None, dry_run=True, find_max=True) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "unknown TPU slice 'v5p-7'" in err[0] and "add --dry_run" in err[1] and "--topology" in err[2]


def test_find_max_batch_bisects_multiples_of_the_batch_shards(monkeypatch):
    """Doubling then bisection over multiples of data*fsdp x microbatches (8 x 2), against a fake fit limit."""
    info = topology.slice_info("v5e-8")
    devices = jax.devices()[:8]
    config = _small_demo(**{"train.microbatches": 2, "train.batch_size": 32})

    def fake_compile(c, limit):
        if c.train.batch_size > limit:
            raise compile_report.DoesNotFit(c.train.batch_size * 10, 100, "fake")
        return {"xla_memory": {"peak": c.train.batch_size}}

    for limit, expected in [(200, 192), (16, 16), (31, 16), (33, 32), (1000, 992), (8, None)]:
        monkeypatch.setattr(compile_report, "compile_for_devices", lambda c, d, i, limit=limit: fake_compile(c, limit))
        best, tries = compile_report.find_max_batch(config, devices, info, log=lambda s: None)
        assert best == expected, limit
        assert all(t["batch_size"] % 16 == 0 for t in tries)
        fits = {t["batch_size"]: t["fits"] for t in tries}
        assert expected is None or (fits[expected] and not fits.get(expected + 16, False)), limit


def test_find_max_batch_command_prints_each_try_and_the_answer(monkeypatch, capsys):
    monkeypatch.setattr(compile_report, "topology_devices", lambda name: jax.devices()[:8])

    def fake_compile(c, devices, info):  # 1 GiB per pair; up to 100 pairs fit
        if c.train.batch_size > 100:
            raise compile_report.DoesNotFit(c.train.batch_size * GiB, 100 * GiB, "fake")
        return {"xla_memory": {"peak": c.train.batch_size * GiB}}

    monkeypatch.setattr(compile_report, "compile_for_devices", fake_compile)
    assert compile_report.main(_small_demo(), "v5e-8", dry_run=True, find_max=True) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[:4] == ["batch 16: fits, peak 16.00 GiB", "batch 32: fits, peak 32.00 GiB",
                       "batch 64: fits, peak 64.00 GiB", "batch 128: does not fit (needs 128.00 GiB)"]
    assert out[-2] == "largest global batch per half that fits v5e-8: 96 (12 per chip)"
    result = json.loads(out[-1])
    assert (result["max_batch_size"], result["per_chip"], len(result["tries"])) == (96, 12, len(out) - 2)
