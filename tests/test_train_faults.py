"""Training under faults, piece by piece (in-process, fast): the workdir lease, a damaged checkpoint,
a torn metrics.jsonl, throughput, the multi-host tokenizer barrier, config checks done before any write.

The end-to-end runs of the command (two runs on one workdir, resume past a damaged step, the
non-finite stop) are in tests/test_train_resume.py."""
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dual_diffusion  # noqa: F401
from dual_diffusion.training import checkpointing, plan_io
from dual_diffusion.training.config_check import ConfigError, check_config
from dual_diffusion.training.lease import LEASE_FILE, Lease, LeaseHeld
from dual_diffusion.training.metrics import MetricsFileError, MetricsWriter, Throughput

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo, stage3  # noqa: E402


# --------------------------------------------------------------------------- lease
def _lease(workdir, **kw):
    return Lease(workdir, heartbeat_s=0.05, settle_s=0.01, **kw)


def _write_lease(workdir, **fields):
    now = time.time()
    info = dict(host=socket.gethostname(), pid=os.getpid(), start_time=now, run_id="other", heartbeat=now)
    info.update(fields)
    (Path(workdir) / LEASE_FILE).write_text(json.dumps(info))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_refuses_a_live_run_and_is_released(tmp_path):
    first = _lease(tmp_path).acquire()
    held = json.loads((tmp_path / LEASE_FILE).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert held["run_id"] == first.info.run_id
    with pytest.raises(LeaseHeld, match=f"in use by run {first.info.run_id}.*--force_takeover"):
        _lease(tmp_path).acquire()
    time.sleep(0.2)  # the heartbeat keeps refreshing it
    assert json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] > held["heartbeat"]
    first.ensure_held()
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    _lease(tmp_path).acquire().release()  # free again


@pytest.mark.parametrize("stale", [
    dict(pid=-1),  # filled in with a pid that has exited
    dict(start_time=0.0),  # our pid, but the lease is older than this process: a reused pid
    dict(host="elsewhere", heartbeat=0.0),  # another host, no heartbeat for ages
])
def test_stale_lease_is_taken_over_with_a_warning(tmp_path, caplog, stale):
    if stale.get("pid") == -1:
        stale = dict(pid=_dead_pid())
    _write_lease(tmp_path, **stale)
    with caplog.at_level(logging.WARNING):
        lease = _lease(tmp_path).acquire()
    assert "taking over the workdir lease of stale run other" in caplog.text
    assert json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == lease.info.run_id
    lease.release()


def test_live_lease_of_another_host_is_refused_unless_forced(tmp_path, caplog):
    _write_lease(tmp_path, host="elsewhere", heartbeat=time.time())
    with pytest.raises(LeaseHeld, match="host elsewhere"):
        _lease(tmp_path).acquire()
    with caplog.at_level(logging.WARNING):
        lease = _lease(tmp_path).acquire(force=True)
    assert "taking over the workdir lease of live run other" in caplog.text
    lease.release()


def test_a_run_whose_lease_was_taken_stops_writing(tmp_path):
    lease = _lease(tmp_path).acquire()
    _write_lease(tmp_path, host="elsewhere", run_id="newer")  # e.g. --force_takeover from another host
    with pytest.raises(LeaseHeld, match="taken over by run newer.*stops without writing"):
        lease.ensure_held()
    lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == "newer"  # not deleted


# --------------------------------------------------------------------------- checkpoints
def _tiny_state(value: float, seed: int):
    w = np.random.default_rng(seed).normal(size=(64, 256)).astype(np.float32) + value
    return {"step": jnp.asarray(int(value), jnp.int32), "params": {"w": jnp.asarray(w)}}


def _truncate_largest(folder: Path) -> None:
    big = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)


def test_damaged_latest_step_is_moved_aside_and_the_previous_restores(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _tiny_state(step, step))
    ckpt.wait()
    _truncate_largest(tmp_path / "checkpoints" / "3" / "state" / "ocdbt.process_0")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state(0, 0))
    step, state = ckpt.restore_latest(abstract)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_tiny_state(2, 2)["params"]["w"]))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3.damaged"]
    assert ckpt.latest_step() == 2
    ckpt.save(3, _tiny_state(3, 3))  # the step can be written again
    ckpt.close()


def test_no_step_restores_is_one_error_and_moves_nothing(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, _tiny_state(1, 1))
    ckpt.save(2, _tiny_state(2, 2))
    ckpt.wait()
    wrong = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}}
    with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint in .* restores \(steps \[2, 1\]\)"):
        ckpt.restore_latest(wrong)  # a config that does not fit: the files are not blamed
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    ckpt.close()


def test_checkpoint_training_the_whole_t5_table_is_one_clear_error(tmp_path):
    """A checkpoint of the layout before the mask row was a parameter of its own (T5's table in params) does
    not resume: one line says why, and nothing is moved aside."""
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    old = {"step": jnp.int32(4), "params": {"text_encoder": {"embedding": jnp.zeros((8, 4))}, "w": jnp.ones(3)}}
    ckpt.save(4, old)
    ckpt.wait()
    now = {"step": jax.ShapeDtypeStruct((), jnp.int32),
           "params": {"text_encoder": {"mask_row": jax.ShapeDtypeStruct((1, 4), jnp.float32)},
                      "w": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    with pytest.raises(checkpointing.CheckpointError, match=r"checkpoint step 4 in .* trains T5's whole embedding "
                       r"table \(params.text_encoder.embedding.*params.text_encoder.mask_row\)"):
        ckpt.restore_latest(now)
    assert os.listdir(tmp_path / "checkpoints") == ["4"]
    ckpt.close()


# --------------------------------------------------------------------------- metrics
def test_torn_last_metrics_line_and_the_old_runs_future_are_dropped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "lo')
    with caplog.at_level(logging.WARNING):
        writer = MetricsWriter(tmp_path, resume_step=3)
    assert f"{path}: dropped a torn last line" in caplog.text
    writer.write(4, {"loss": 0.5})
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_unreadable_metrics_line_in_the_middle_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl: line 2 is not JSON"):
        MetricsWriter(tmp_path, resume_step=2)


def test_throughput_is_measured_from_the_start_and_excludes_the_compile_later():
    meter = Throughput(start_step=10)
    time.sleep(0.02)  # "compile" of step 11
    meter.restart(11)
    first = meter.rate(11, samples_per_step=4)  # a row at the compiled step: includes the compile
    assert first is not None and 0 < first < 4 / 0.02 * 1.01
    time.sleep(0.01)
    assert meter.rate(13, samples_per_step=4) > first
    assert meter.rate(13, samples_per_step=4) is None  # no step since the last call


# --------------------------------------------------------------------------- tokenizer on several hosts
def test_other_processes_wait_for_process_0s_tokenizer(tmp_path, monkeypatch):
    from jax.experimental import multihost_utils

    import dual_diffusion.tokenizer as tok_module

    events = []
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: events.append(("barrier", name)))
    monkeypatch.setattr(tok_module, "train_sentencepiece", lambda *a, **k: events.append(("train",)))
    monkeypatch.setattr(tok_module, "Tokenizer", lambda path: events.append(("open", Path(path).name)))
    plan_io.get_tokenizer(demo.get_config(), tmp_path)
    assert events == [("barrier", "dual_diffusion:tokenizer_written"), ("open", "spiece.model")]
    events.clear()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    plan_io.get_tokenizer(demo.get_config(), tmp_path)
    assert events == [("train",), ("barrier", "dual_diffusion:tokenizer_written"), ("open", "spiece.model")]


# --------------------------------------------------------------------------- config, before any write
def test_every_missing_data_source_is_reported_at_once_with_its_key(tmp_path):
    c = stage3.get_config()
    present = tmp_path / "captions.jsonl"
    present.write_text("[]")
    with c.unlocked():
        c.data.t2i_sources[0]["path"] = str(present)
        c.data.i2t_sources[1]["path"] = str(tmp_path / "missing.json")
        c.tokenizer.model_file = str(present)
    with pytest.raises(ConfigError) as e:
        check_config(c, num_devices=8)
    problems = str(e.value).splitlines()[1:]
    fill_me = [k for k, spec in enumerate(c.data.i2t_sources) if "FILL_ME" in spec["path"]]
    assert len(fill_me) >= 2 and 1 not in fill_me
    assert len(problems) == 1 + len(fill_me)  # every missing source, nothing else
    assert not any("t2i_sources" in p for p in problems)
    assert f"config.data.i2t_sources[1].path='{tmp_path / 'missing.json'}': no such file" in problems[0 + (0 in fill_me)]
    for k in fill_me:
        assert any(f"config.data.i2t_sources[{k}].path='FILL_ME/" in p for p in problems), k


def test_fill_me_message_suggests_an_override_that_ml_collections_accepts(tmp_path):
    from absl import flags
    from ml_collections import config_flags

    c = stage3.get_config()
    with pytest.raises(ConfigError) as e:
        check_config(c, num_devices=8)
    suggestion = next(line for line in str(e.value).splitlines() if "i2t_sources[0].path='FILL_ME" in line)
    flag = suggestion.split("(")[-1].rstrip(")").replace("/your/copy/...", str(tmp_path / "mix.json"))
    assert flag.startswith("--config.data.i2t_sources[0].path=")
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    argv = ["prog", "--config=configs/stage3.py", flag]
    saved, sys.argv = sys.argv, argv  # ml_collections reads overrides from sys.argv
    try:
        values(argv)
    finally:
        sys.argv = saved
    assert values.config.data.i2t_sources[0]["path"] == str(tmp_path / "mix.json")


def test_dry_run_sizes_a_trained_tokenizer_from_its_target():
    c = demo.get_config()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        plan_io.resolve_vocab(demo.get_config(), None, None)
    plan_io.resolve_vocab(c, None, None, dry_run=True)
    assert c.model.transformer.vocab_size == c.model.text_encoder.vocab_size == c.tokenizer.train_vocab_size
