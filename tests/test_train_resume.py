"""The train entry point as a subprocess: exact resume after SIGKILL, SIGTERM saves, non-finite stop.

Tiny demo runs (1-layer networks, batch 8); a shared persistent compilation
cache keeps the repeated compiles of the same step cheap.
"""
import json
import os
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

from dual_diffusion.pretrained import load_pretrained
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
    caps = json.loads((tmp_path / "samples" / "step_3_captions.json").read_text())
    assert len(caps["captions"]) == 2 and len(caps["prompts"]) == 4
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
def test_consecutive_nonfinite_losses_stop_with_a_checkpoint(env, tmp_path):
    # lr 1e30: the first real update blows the weights up, every later loss is inf/nan.
    rc, _, err = _finish(_start(env, tmp_path, "--config.train.num_steps=20", "--config.optimizer.lr=1e30",
                                "--config.optimizer.clip_norm=0", "--config.train.max_consecutive_nonfinite=2"))
    assert rc != 0 and "consecutive non-finite" in err, err[-3000:]
    latest = Checkpointer(tmp_path, async_save=False).latest_step()
    state = _state(tmp_path, latest)
    assert latest < 20 and int(state["nonfinite"]) >= 2
    params = [np.asarray(x) for x in jax_leaves(state["params"])]
    assert all(np.isfinite(p).all() for p in params)  # the last good state, not the exploded one
