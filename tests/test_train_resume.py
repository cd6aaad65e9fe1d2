"""The train entry point as a subprocess: exact resume after SIGKILL, SIGTERM saves, non-finite stop,
two runs on one workdir, resume past a damaged checkpoint.

Tiny demo runs (1-layer networks, batch 8); a shared persistent compilation
cache keeps the repeated compiles of the same step cheap.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

import dual_diffusion  # noqa: F401
from flax import nnx

from dual_diffusion.checkpoints.pretrained import load_pretrained
from dual_diffusion.training.checkpointing import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config=configs/demo.py", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.checkpoint.every_steps=3", "--config.eval.shapes_suite=False",
        "--config.model.transformer.num_layers=1", "--config.model.text_encoder.num_layers=1",
        "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=2", "--config.data.text_length=24"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start(env, workdir, *extra):
    return subprocess.Popen([sys.executable, "-m", "dual_diffusion.train", *TINY, f"--workdir={workdir}", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _run_until_checkpoint(proc, workdir: Path, step: int, timeout=900):
    """Waits until WORKDIR/checkpoints/<step> is complete (Orbax renames it into place at the end)."""
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before checkpoint {step}:\n"
                                 + proc.stderr.read()[-3000:])
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint {step} after {timeout}s")
        time.sleep(0.2)


def _metrics(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "samples_per_sec"} for r in rows]


def _state(workdir: Path, step: int) -> dict:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(workdir / "checkpoints" / str(step) / "state")


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(env, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    rc, _, err = _finish(_start(env, straight, "--config.train.num_steps=6"))
    assert rc == 0, err[-3000:]

    proc = _start(env, killed, "--config.train.num_steps=6")
    _run_until_checkpoint(proc, killed, 3)
    proc.send_signal(signal.SIGKILL)  # hard kill: no handler runs
    proc.wait()
    rc, _, err = _finish(_start(env, killed, "--config.train.num_steps=6"))
    assert rc == 0, err[-3000:]
    assert "resumed from step" in err or (killed / "checkpoints" / "6").is_dir()

    assert _metrics(killed) == _metrics(straight)
    a, b = _state(straight, 6), _state(killed, 6)
    leaves_a, leaves_b = jax_leaves(a), jax_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _demo_config():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from configs import demo

    return demo.get_config()


@pytest.mark.slow
def test_sigterm_saves_current_step_and_partial_checkpoints_are_ignored(env, tmp_path):
    proc = _start(env, tmp_path, "--config.train.num_steps=1000", "--config.samples.every_steps=3",
                  "--config.samples.image_steps=2", "--config.samples.text_steps=2",
                  "--config.samples.num_caption_images=2")
    _run_until_checkpoint(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    rc, _, err = _finish(proc)
    assert rc == 0, err[-3000:]
    ckpt = Checkpointer(tmp_path, async_save=False)
    latest = ckpt.latest_step()
    assert latest >= 3 and f"stopped at step {latest}" in err
    assert int(_state(tmp_path, latest)["step"]) == latest
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == latest
    assert (tmp_path / "samples" / "step_3_images.png").is_file()
    assert "samples for step 3 written to" in err
    caps = json.loads((tmp_path / "samples" / "step_3_captions.json").read_text())
    assert len(caps["captions"]) == 2 and caps["prompts"] == list(_demo_config().samples.prompts)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # A half-written step (Orbax's temporary folder) is never picked up.
    (tmp_path / "checkpoints" / f"{latest + 50}.orbax-checkpoint-tmp-123").mkdir()
    ckpt.close()
    assert Checkpointer(tmp_path, async_save=False).latest_step() == latest
    # The workdir loads for sampling: its latest EMA weights, over the frozen ones.
    bundle = load_pretrained(os.path.relpath(tmp_path))  # relative, as a user types it
    assert bundle.info["step"] == latest and bundle.info["weights"] == "ema" and bundle.vae is None
    ema = _state(tmp_path, latest)["ema"]["transformer"]
    loaded = nnx.to_pure_dict(bundle.states["transformer"])
    np.testing.assert_array_equal(np.asarray(loaded["text_out_proj"]["kernel"]), ema["text_out_proj"]["kernel"])
    ids = np.asarray(bundle.tokenizer.encode("a red circle"))[None]
    _, logits = bundle.transformer(None, bundle.text_encoder(ids), np.zeros(1, np.float32))
    assert logits.shape == (1, ids.shape[1], bundle.configs["transformer"].vocab_size)


@pytest.mark.slow
def test_consecutive_nonfinite_losses_stop_after_exactly_the_limit_without_saving(env, tmp_path):
    # lr 1e30: step 2's update (the first with lr > 0) ruins the weights, every later loss is non-finite.
    limit = 3
    rc, _, err = _finish(_start(env, tmp_path, "--config.train.num_steps=20", "--config.optimizer.lr=1e30",
                                "--config.optimizer.clip_norm=0", f"--config.train.max_consecutive_nonfinite={limit}"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    rows = _metrics(tmp_path)
    bad = [r["step"] for r in rows if not np.isfinite(r["loss"])]
    first_bad = bad[0]
    stopped = first_bad + limit - 1
    assert bad == list(range(first_bad, stopped + 1)) and rows[-1]["step"] == stopped  # exactly `limit` skips
    assert rows[-1]["nonfinite_total"] == limit
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) <= stopped  # the state it stopped with (one step further) is not saved
    assert f"stopped at step {stopped}: {limit} consecutive updates skipped" in errors[0]
    assert f"the last good checkpoint is step {max(steps)}" in errors[0]
    assert int(_state(tmp_path, max(steps))["step"]) == max(steps)


def _truncate_largest(folder: Path) -> None:
    big = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)


@pytest.mark.slow
def test_two_runs_on_one_workdir_then_a_damaged_latest_checkpoint(env, tmp_path):
    # Two runs started together: one takes the workdir lease, the other refuses with one line.
    procs = [_start(env, tmp_path, "--config.train.num_steps=6") for _ in range(2)]
    results = [_finish(p) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], [err[-2000:] for _, _, err in results]
    refused = next(err for rc, _, err in results if rc == 2)
    assert [line for line in refused.splitlines() if line.strip()][-1].startswith("error: --workdir=")
    assert "is in use by run" in refused and "Traceback" not in refused
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one run's rows, each once
    assert not (tmp_path / "lease.json").exists()  # released at the end
    # The console: the run's own lines, no absl/Orbax INFO lines; a measured rate is never 0.
    console = next(err for rc, _, err in results if rc == 0)
    assert not re.search(r"^I\d{4} ", console, re.M), console[:2000]
    for line in ("compiling the train step", "compiled the train step and ran step 1 in",
                 "step 6/6 (100%)", "samples/s  ETA", "checkpoint step 6"):
        assert line in console, line
    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples_per_sec"] > 0 for r in raw)

    # Step 6 damaged (one file cut in half): sampling falls back to step 3 ...
    _truncate_largest(tmp_path / "checkpoints" / "6" / "state" / "ocdbt.process_0")
    with pytest.warns(UserWarning, match="does not restore"):
        assert load_pretrained(tmp_path).info["step"] == 3
    # ... and a rerun moves step 6 aside, resumes from 3 and repeats steps 4-6 exactly.
    rc, _, err = _finish(_start(env, tmp_path, "--config.train.num_steps=6"))
    assert rc == 0, err[-3000:]
    assert "moved aside" in err and "resumed from step 3" in err
    assert (tmp_path / "checkpoints" / "6.damaged").is_dir() and (tmp_path / "checkpoints" / "6").is_dir()
    assert _metrics(tmp_path) == rows  # identical losses, grad norms and lr; each step once
