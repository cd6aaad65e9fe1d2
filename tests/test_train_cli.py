"""The train command's usage and config errors: one line `error: ...`, exit status 2, no traceback,
nothing written to the workdir; --verbose shows the traceback. And --dry_run for every config file
and variant in configs/ (no tokenizer, no data, no weights).

The commands run through train.cli in forks of one subprocess (tests/train_helpers.py), the same
code path as `python -m dual_diffusion.train`.
"""
import json

import pytest
from train_helpers import run_train_commands

DEMO = "--config=configs/demo.py"


def _one_line_error(result) -> str:
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), result
    assert "Traceback" not in result["stderr"] + result["stdout"]
    return lines[0]


def test_every_usage_and_config_error_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    w = f"--workdir={workdir}"
    cases = {
        "unknown key": [DEMO, w, "--config.train.foo=1"],
        "unknown group": [DEMO, w, "--config.trian.batch_size=1"],
        "index out of range": [DEMO, w, "--config.data.t2i_sources[3].path=/x"],
        "negative batch": [DEMO, w, "--config.train.batch_size=-8"],
        "batch not divisible": [DEMO, w, "--config.train.batch_size=12"],
        "not a number": [DEMO, w, "--config.train.batch_size=abc"],
        "workdir is a file": [DEMO, f"--workdir={a_file}"],
        "workdir under a file": [DEMO, f"--workdir={a_file}/sub"],
        "missing config file": ["--config=configs/nope.py", w],
        "unknown variant": ["--config=configs/demo.py:tpu", w],
        "no config": [w],
        "no workdir": [DEMO],
        "missing sources": ["--config=configs/stage1.py", w],
        # the demo's t2i source made a JSON source without a path: found before the tokenizer is trained
        "source without path": [DEMO, w, "--config.data.t2i_sources[0].kind=json"],
    }
    results = run_train_commands([{"argv": argv} for argv in cases.values()] +
                                 [{"argv": cases["unknown key"] + ["--verbose"]},
                                  {"argv": cases["unknown key"], "env": {"DD_VERBOSE": "1"}}], tmp_path)
    msg = {name: _one_line_error(r) for name, r in zip(cases, results)}
    assert msg["unknown key"].startswith("error: --config.train.foo=1: unknown config key config.train.foo: "
                                         "config.train has no 'foo' (its keys: batch_size, ")
    assert "config has no 'trian'" in msg["unknown group"]
    assert "config.data.t2i_sources has 1 entries, index 3 is out of range" in msg["index out of range"]
    assert "config.train.batch_size=-8: expected an integer in [1, inf)" in msg["negative batch"]
    assert "config.train.batch_size=12 (/1 microbatches) is not divisible by the 8 batch shards" in msg[
        "batch not divisible"]
    assert "--config.train.batch_size=abc" in msg["not a number"]
    assert f"--workdir={a_file}: exists and is not a directory" in msg["workdir is a file"]
    assert f"{a_file} is a file, not a directory" in msg["workdir under a file"]
    assert "--config=configs/nope.py: no such file 'configs/nope.py'" in msg["missing config file"]
    assert "unknown config variant 'tpu'" in msg["unknown variant"]
    assert "--config is required" in msg["no config"]
    assert "--workdir is required" in msg["no workdir"]
    sources = msg["missing sources"]  # all of them, each with the override that fills it in
    for stream in ("t2i_sources", "i2t_sources"):
        assert (f"config.data.{stream}[0].path='FILL_ME/" in sources
                and f"--config.data.{stream}[0].path=/your/copy/" in sources), stream
    assert "config.data.t2i_sources[0].path is not set" in msg["source without path"]
    assert not workdir.exists()  # no tokenizer, config.json or lease was written by any of them
    for verbose in results[len(cases):]:
        assert verbose["rc"] != 0 and "Traceback" in verbose["stderr"], verbose["stderr"][-2000:]


CONFIGS_FAST = ["configs/demo.py", "configs/demo.py:gpu"]
# Every other config file and variant, with one layer per network (abstract init of the full 7B model takes
# minutes on 2 cores); stage2.py runs at full size below. stage2.py:512 is stage2.py's default size.
CONFIGS_ONE_LAYER = ["configs/stage1.py", "configs/stage2.py:256", "configs/stage3.py"]
ONE_LAYER = ["--config.model.transformer.num_layers=1", "--config.model.text_encoder.num_layers=1"]
CONFIGS_FULL = ["configs/stage2.py"]


def _dry_runs(configs, tmp_path, extra=()):
    results = run_train_commands([{"argv": [f"--config={c}", "--dry_run", *extra]} for c in configs], tmp_path)
    return dict(zip(configs, results))


@pytest.fixture(scope="module")
def fast_dry_runs(tmp_path_factory):
    runs = _dry_runs(CONFIGS_FAST, tmp_path_factory.mktemp("dry"))
    runs.update(_dry_runs(CONFIGS_ONE_LAYER, tmp_path_factory.mktemp("dry_one_layer"), ONE_LAYER))
    return runs


@pytest.fixture(scope="module")
def full_dry_runs(tmp_path_factory):
    return _dry_runs(CONFIGS_FULL, tmp_path_factory.mktemp("dry_full"))


def _check_report(result):
    assert result["rc"] == 0, result["stderr"][-3000:]
    report = json.loads(result["stdout"].strip().splitlines()[-1])
    assert report["params"]["transformer"] > 0 and report["bytes_per_device"]["params"] > 0
    assert "mesh:" in result["stdout"] and "transformer:" in result["stdout"]
    return report


@pytest.mark.parametrize("config", CONFIGS_FAST)
def test_dry_run_of_demo_configs(fast_dry_runs, config):
    report = _check_report(fast_dry_runs[config])
    assert report["params"]["vae"] == 0  # pixel space


@pytest.mark.parametrize("config", CONFIGS_ONE_LAYER)
def test_dry_run_of_stage_configs_and_variants(fast_dry_runs, config):
    report = _check_report(fast_dry_runs[config])
    assert report["params"]["vae"] == 83_819_683
    # The release keeps T5 frozen in stages 1 and 3 (no T5 parameter in the trained state); stage 2 trains
    # its mask row.
    trains_t5 = config.startswith("configs/stage2")
    assert ("frozen (trainable: mask_row)" in fast_dry_runs[config]["stdout"]) == trains_t5


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS_FULL)
def test_dry_run_of_full_size_configs(full_dry_runs, config):
    report = _check_report(full_dry_runs[config])
    assert report["params"] == {"transformer": 2_102_856_100, "text_encoder": 4_762_310_656, "vae": 83_819_683}
    if config == "configs/stage2.py":  # T5's mask row trains in stage 2: a (1, 4096) parameter of its own
        per_dev = report["bytes_per_device"]
        # fsdp over 8 devices: the trainable float32 weights (the MM-DiT) split 8 ways, the mask row whole.
        assert per_dev["params"] == pytest.approx(2_102_856_100 * 4 / 8 + 4096 * 4, rel=0.01)
        # the frozen T5 in bf16, split 8 ways, and the VAE's (replicated) bf16 convolutions
        assert per_dev["frozen"] == pytest.approx(4_762_310_656 * 2 / 8 + 83_819_683 * 2, rel=0.03)
        assert per_dev["optimizer"] == pytest.approx(2 * per_dev["params"], rel=0.01)
        assert per_dev["ema"] == per_dev["params"]
