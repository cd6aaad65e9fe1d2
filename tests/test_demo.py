"""The offline demo learns: a short run of configs/demo.py, then what an untrained model cannot do.

Trains the default demo (its one-object world) with captions as its only image-to-text task through the CLI
(python -m dual_diffusion.train) in a subprocess for STEPS steps, restores the checkpoint here and captions
held-out renders (sizes and draws of the evaluation seed, never a training record). Asserted:
- the text loss ends far below ln(V) (a uniform guess over the vocabulary);
- the captions name the color of the object in at least MIN_COLOR of the images, read by the shapes
  suite's own caption scorer. Chance is 1/4 (four colors: a guesser names 0.4 of 64 once in ~230); an
  untrained model names none. 150 steps name it in about half: what this world needs to be learned well
  comes later (the image loss drops at steps 1100-1500, the yes/no answers by 1000-2300: README, The demo).
"""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 150
MIN_COLOR = 0.4


# The demo with captions as its only image-to-text task: 3 VQA rows in 4 (the demo's mix, for its yes/no
# questions) leave too few captions for 150 steps, and a config file is how a list of sources is changed.
CAPTIONS_ONLY = """from configs import demo


def get_config():
    c = demo.get_config()
    c.data.i2t_sources = [dict(c.data.i2t_sources[0], tasks=("caption",))]
    return c
"""


def _train(workdir: Path) -> str:
    config = workdir.parent / f"{workdir.name}_config.py"
    config.write_text(CAPTIONS_ONLY)
    cmd = [sys.executable, "-m", "dual_diffusion.train", f"--config={config}", f"--workdir={workdir}",
           f"--config.train.num_steps={STEPS}", "--config.train.batch_size=16", "--config.train.log_every=25",
           f"--config.checkpoint.every_steps={STEPS}", "--config.checkpoint.async_save=False",
           "--config.samples.every_steps=0", "--config.ema.decay=0.0", "--config.eval.shapes_suite=False"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr


def _restore(workdir: Path):
    import jax

    import dual_diffusion  # noqa: F401  (flax flags before any module is built)
    from configs import demo
    from dual_diffusion.sharding import DEFAULT_RULES, make_mesh
    from dual_diffusion.tokenizer import Tokenizer
    from dual_diffusion.training import checkpointing, plan_io, samples
    from dual_diffusion.training.loss import LossConfig
    from dual_diffusion.training.state import make_plan

    config = demo.get_config()
    config.ema.decay = 0.0  # as trained (_train): the state has no EMA copy
    tok = Tokenizer(workdir / "tokenizer" / "spiece.model")
    plan_io.resolve_vocab(config, tok, None)
    plan = make_plan(config, make_mesh(1, 1, 1, devices=jax.devices()[:1]), DEFAULT_RULES, tok.mask_id)
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    state = ckpt.restore(ckpt.latest_step(), plan.abstract_state)
    frozen = checkpointing.restore_frozen(workdir, plan.abstract_frozen)
    sampler = samples.Sampler(config, plan, tok, None, LossConfig.from_config(config.loss, tok.mask_id, tok.eos_id))
    return config, sampler, sampler.states(state, frozen), len(tok)


@pytest.mark.slow
def test_short_demo_run_learns_to_name_colors(tmp_path):
    from dual_diffusion.data import shapes_eval
    from dual_diffusion.data.shapes import world_of_run

    start = time.time()
    log = _train(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss_text"] for row in rows]
    assert len(losses) == STEPS // 25, log[-2000:]
    config, sampler, states, vocab = _restore(tmp_path)
    # The last two logged windows: single batches are noisy.
    assert np.mean(losses[-2:]) < 0.5 * math.log(vocab), losses

    held_out = shapes_eval.caption_eval_set(4321, 64, sampler.pipeline.image_size, world_of_run(config))
    captions = sampler.pipeline.caption(states, held_out.images, seed=0, opts=sampler.text_opts)
    scores = shapes_eval.evaluate_captions(captions, held_out.scenes)
    assert scores["color_accuracy"] >= MIN_COLOR, list(zip(held_out.captions, captions))
    print(f"demo test: {STEPS} steps, text loss {losses[0]:.2f} -> {losses[-1]:.2f} (ln V = {math.log(vocab):.2f}), "
          f"held-out captions: color {scores['color_accuracy']:.2f}, shape {scores['shape_accuracy']:.2f}, "
          f"exact {scores['exact_match']:.2f}, {time.time() - start:.0f} s")
