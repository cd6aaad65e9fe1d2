"""gs:// workdirs: training, resume, metrics, samples, the lease and load_pretrained on a faked bucket.

`fake_gcs(root)` maps every gs://BUCKET/PATH to ROOT/BUCKET/PATH in the two places a
workdir's bytes go through: etils.epath (its gs:// backend, through
`epath.testing.mock_epath`) and Orbax's TensorStore spec for gs:// (its GCS driver
replaced by the file driver at the mapped folder). Every gs:// call is logged, so the
tests can tell that nothing was appended to an object and that the lease was written
at gs://bucket/run/lease.json. The training runs fork from one subprocess that
installs the fake first, with the working directory in tmp_path: a path mangled to
the local folder `gs:/...` would show up there.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import dual_diffusion  # noqa: F401
from train_helpers import run_train_commands

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "gs://"


@contextlib.contextmanager
def fake_gcs(root: str | os.PathLike, log: str | os.PathLike | None = None):
    """gs://B/P -> ROOT/B/P for epath and Orbax/TensorStore; LOG (optional) gets one JSON line per gs:// call."""
    from unittest import mock

    from etils.epath import testing
    from orbax.checkpoint._src.path import gcs_utils

    root = os.fspath(root)

    def to_local(p):
        s = os.fspath(p)
        return os.path.join(root, s[len(PREFIX):]) if s.startswith(PREFIX) else s

    def to_url(p):
        s = os.fspath(p)
        return PREFIX + os.path.relpath(s, root) if s.startswith(root + os.sep) else s

    def record(op, *paths, **extra):
        if log is not None and any(os.fspath(p).startswith(PREFIX) for p in paths):
            with open(log, "a") as f:
                f.write(json.dumps({"op": op, "paths": [os.fspath(p) for p in paths], **extra}) + "\n")

    def one(op):
        def mocked(original, path, *args, **kwargs):
            record(op, path, **({"mode": args[0]} if op == "open" else {}))
            if op == "open" and set(args[0]) & set("wax") and os.fspath(path).startswith(PREFIX):
                os.makedirs(os.path.dirname(to_local(path)), exist_ok=True)  # a store has no folders to make
            return original(to_local(path), *args, **kwargs)
        return mocked

    def two(op):
        def mocked(original, path, dst, *args, **kwargs):
            record(op, path, dst)
            return original(to_local(path), to_local(dst), *args, **kwargs)
        return mocked

    def glob(original, pattern):
        record("glob", pattern)
        return [to_url(p) for p in original(to_local(pattern))]

    def walk(original, top, **kwargs):
        record("walk", top)
        for dirpath, dirnames, filenames in original(to_local(top), **kwargs):
            yield to_url(dirpath), dirnames, filenames

    def kvstore(path):  # TensorStore's file driver at the mapped folder instead of its GCS driver
        return {"driver": "file", "path": to_local(path)}

    fns = {op: one(op) for op in ("exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree",
                                  "stat")}
    fns.update({op: two(op) for op in ("rename", "replace", "copy")}, glob=glob, walk=walk)
    with testing.mock_epath(**fns), \
            mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore), \
            mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False):
        yield


def _log_rows(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --------------------------------------------------------------------------- fast: helpers, metrics, samples
def test_workdir_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    from dual_diffusion.checkpoints.paths import is_local, workdir_path

    monkeypatch.chdir(tmp_path)
    assert os.fspath(workdir_path("gs://bucket/run")) == "gs://bucket/run"
    assert os.fspath(workdir_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert os.fspath(workdir_path("rel/run")) == str(tmp_path / "rel" / "run")
    assert not is_local("gs://bucket/run") and is_local("rel/run") and is_local(tmp_path)


def test_check_workdir_and_json_on_gcs(tmp_path, monkeypatch):
    from ml_collections import ConfigDict

    from dual_diffusion.training import checkpointing

    monkeypatch.chdir(tmp_path)
    with fake_gcs(tmp_path / "store"):
        path = checkpointing.check_workdir("gs://bucket/run")
        assert os.fspath(path) == "gs://bucket/run"
        checkpointing.write_workdir_json(path, ConfigDict({"seed": 3}), {"transformer": {"a": 1}})
        (path / "afile").write_text("x")
        with pytest.raises(checkpointing.WorkdirError, match="afile: exists and is not a directory"):
            checkpointing.check_workdir("gs://bucket/run/afile")
    assert json.loads((tmp_path / "store/bucket/run/model.json").read_text()) == {"transformer": {"a": 1}}
    assert json.loads((tmp_path / "store/bucket/run/config.json").read_text())["seed"] == 3
    assert not (tmp_path / "gs:").exists()


def test_metrics_on_gcs_rewrite_the_file_and_never_append(tmp_path, monkeypatch):
    from dual_diffusion.training.metrics import MetricsWriter

    monkeypatch.chdir(tmp_path)
    stored = tmp_path / "store/bucket/run/metrics.jsonl"
    stored.parent.mkdir(parents=True)
    # Steps 1-5 of an earlier run that died after its checkpoint at step 3, with a torn last line.
    stored.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    log = tmp_path / "calls.jsonl"
    with fake_gcs(tmp_path / "store", log):
        writer = MetricsWriter("gs://bucket/run", resume_step=3)
        assert [json.loads(x)["step"] for x in stored.read_text().splitlines()] == [1, 2, 3]
        writer.write(4, {"loss": np.float32(0.25)})
        writer.write(5, {"loss": 0.5})
        writer.close()
    rows = [json.loads(x) for x in stored.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[3]["loss"] == 0.25
    opens = [r for r in _log_rows(log) if r["op"] == "open"]
    assert opens and not any("a" in r["mode"] for r in opens)  # an object cannot be appended to
    assert any(r["op"] == "replace" and r["paths"][1] == "gs://bucket/run/metrics.jsonl" for r in _log_rows(log))
    assert not (tmp_path / "store/bucket/run/tensorboard").exists() and not (tmp_path / "gs:").exists()


def test_local_metrics_still_append(tmp_path):
    from dual_diffusion.training.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 1.0})
    first = (tmp_path / "metrics.jsonl").stat().st_ino
    writer.write(2, {"loss": 2.0})
    writer.close()
    assert (tmp_path / "metrics.jsonl").stat().st_ino == first  # appended in place, not replaced
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "tensorboard").is_dir()


def test_samples_written_to_gcs(tmp_path, monkeypatch):
    from PIL import Image

    from dual_diffusion.training.samples import write_samples

    monkeypatch.chdir(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    with fake_gcs(tmp_path / "store"):
        write_samples("gs://bucket/run/samples", 7, images, {"captions": ["a"]})
    out = tmp_path / "store/bucket/run/samples"
    np.testing.assert_array_equal(np.asarray(Image.open(out / "step_7_images.png")), np.concatenate(images, axis=1))
    assert json.loads((out / "step_7_captions.json").read_text()) == {"captions": ["a"]}
    assert not (tmp_path / "gs:").exists()


def test_lease_on_gcs(tmp_path, monkeypatch):
    from dual_diffusion.training.lease import Lease, LeaseHeld

    monkeypatch.chdir(tmp_path)
    with fake_gcs(tmp_path / "store"):
        first = Lease("gs://bucket/run", settle_s=0.0).acquire()
        held = json.loads((tmp_path / "store/bucket/run/lease.json").read_text())
        assert held["run_id"] == first.info.run_id and held["pid"] == os.getpid()
        with pytest.raises(LeaseHeld, match="gs://bucket/run is in use by run"):
            Lease("gs://bucket/run", settle_s=0.0).acquire()
        first.release()
    assert not (tmp_path / "store/bucket/run/lease.json").exists() and not (tmp_path / "gs:").exists()


def test_damaged_step_on_gcs_is_moved_aside_and_the_previous_restores(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    from dual_diffusion.training.checkpointing import Checkpointer

    monkeypatch.chdir(tmp_path)
    state = lambda v: {"step": jnp.asarray(v, jnp.int32), "params": {"w": jnp.full((64, 256), float(v))}}
    folder = tmp_path / "store/bucket/run/checkpoints"
    with fake_gcs(tmp_path / "store"):
        ckpt = Checkpointer("gs://bucket/run", async_save=False)
        assert os.fspath(ckpt.directory) == "gs://bucket/run/checkpoints"
        for step in (1, 2):
            ckpt.save(step, state(step))
        ckpt.wait()
        big = max((p for p in (folder / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
        step, restored = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0)))
        assert step == 1 and float(restored["params"]["w"][0, 0]) == 1.0
        ckpt.close()
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2.damaged"]
    assert not (tmp_path / "gs:").exists()


def test_gcs_workdir_without_gcsfs_is_one_error(tmp_path, monkeypatch):
    import importlib.util

    from dual_diffusion.training import checkpointing

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: gs:// would be reached for real")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(checkpointing.WorkdirError, match=r"--workdir=gs://bucket/run: .*needs gcsfs"):
        checkpointing.check_workdir("gs://bucket/run")
    assert not (tmp_path / "gs:").exists()


def test_sample_and_evaluate_take_a_gcs_checkpoint(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from dual_diffusion import evaluate, sample
    from dual_diffusion.cli import UsageError
    from dual_diffusion.convert import components

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "store/bucket/run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"samples": {"t2i_steps": 5}}))
    (run / components.INFO_FILE).write_text("{}")
    args = SimpleNamespace(checkpoint="gs://bucket/run", task="t2i", image=[], mask=[], question=[], steps=None,
                           num_images=None, batch_size=None, length=None, num_blocks=None)
    with fake_gcs(tmp_path / "store"):
        sample._check(args)  # the folder exists: no "no such folder"
        with pytest.raises(UsageError, match="gs://bucket/nothing: no such folder"):
            sample._check(SimpleNamespace(**dict(vars(args), checkpoint="gs://bucket/nothing")))
        assert evaluate.preset_config("demo", "gs://bucket/run") == {"samples": {"t2i_steps": 5}}
        out = evaluate.default_out_dir("gs://bucket/run")
        with pytest.raises(ValueError, match=f"gs://bucket/run/{components.INFO_FILE}: format None"):
            components.read_info("gs://bucket/run")
    assert os.fspath(out) == "gs://bucket/run/eval" and (run / "eval").is_dir()
    assert not (tmp_path / "gs:").exists()


# --------------------------------------------------------------------------- a tiny training on gs://
# train_helpers.run_train_commands runs the commands in forks of one subprocess, inside fake_gcs.
TINY = [f"--config={ROOT / 'configs/demo.py'}", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.checkpoint.every_steps=3", "--config.eval.shapes_suite=False",
        "--config.model.transformer.num_layers=1", "--config.model.text_encoder.num_layers=1",
        "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=2", "--config.data.text_length=24"]


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "samples_per_sec"} for r in rows]


@pytest.mark.slow
def test_training_on_a_gcs_workdir_resumes_exactly_and_loads(tmp_path):
    """Straight 6 steps (with samples at 6) vs 3 steps then a resume to 6, both on gs://; then
    load_pretrained of the gs:// workdir equals that of its folder in the fake store (copied off the bucket:
    model.json's gs:// tokenizer name is found inside the folder)."""
    store, log, cwd = tmp_path / "store", tmp_path / "calls.jsonl", tmp_path / "cwd"
    cwd.mkdir()
    samples = ["--config.samples.every_steps=6", "--config.samples.image_steps=2", "--config.samples.text_steps=2"]
    cases = [{"argv": [*TINY, "--workdir=gs://bucket/straight", "--config.train.num_steps=6", *samples]},
             {"argv": [*TINY, "--workdir=gs://bucket/run", "--config.train.num_steps=3"]},
             {"argv": [*TINY, "--workdir=gs://bucket/run", "--config.train.num_steps=6"]}]
    results = run_train_commands(cases, tmp_path, timeout=1500, cwd=cwd,
                                 context=("test_workdir_gcs", "fake_gcs", [str(store), str(log)]))
    for r in results:
        assert r["rc"] == 0, r["stderr"][-3000:]
    assert "resumed from step 3 in gs://bucket/run/checkpoints" in results[2]["stderr"]

    run, straight = store / "bucket/run", store / "bucket/straight"
    assert _metrics(run / "metrics.jsonl") == _metrics(straight / "metrics.jsonl")  # same losses, each step once
    assert [r["step"] for r in _metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert (run / "frozen").is_dir() and (run / "tokenizer/spiece.model").is_file()
    assert json.loads((run / "model.json").read_text())["tokenizer"] == "gs://bucket/run/tokenizer/spiece.model"
    calls = _log_rows(log)
    lease_writes = [c for c in calls if c["op"] == "replace" and c["paths"][1] == "gs://bucket/run/lease.json"]
    assert len(lease_writes) >= 2  # taken by each run on gs://bucket/run ...
    assert not (run / "lease.json").exists()  # ... and released at its end
    assert not any(c["op"] == "open" and "a" in c["mode"] for c in calls)
    assert not (cwd / "gs:").exists() and not (ROOT / "gs:").exists()
    assert "samples for step 6 written to gs://bucket/straight/samples" in results[0]["stderr"]
    assert (straight / "samples/step_6_images.png").stat().st_size > 0
    assert len(json.loads((straight / "samples/step_6_captions.json").read_text())["captions"]) == 4

    from dual_diffusion.checkpoints.pretrained import load_pretrained
    from flax import nnx

    with fake_gcs(store):
        remote = load_pretrained("gs://bucket/run", components=("transformer",))
    local = load_pretrained(run, components=("transformer",))
    assert remote.info["step"] == local.info["step"] == 6 and os.fspath(remote.path) == "gs://bucket/run"
    leaves = lambda b: [np.asarray(x) for x in jax_leaves(nnx.to_pure_dict(b.states["transformer"]))]
    for a, b in zip(leaves(remote), leaves(local), strict=True):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)
