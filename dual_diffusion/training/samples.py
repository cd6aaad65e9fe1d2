"""Periodic samples during training, and the shapes-suite scores at the end of the demo.

A thin layer over dual_diffusion.inference.pipelines: the train state's weights (EMA when
the run keeps one) plus the frozen weights make each network's state. Written to
WORKDIR/samples/step_<N>_images.png (one image per fixed prompt, in a row) and
WORKDIR/samples/step_<N>_captions.json (captions of fixed images of the run's shapes world),
through etils.epath (a gs:// workdir too).
"""
from __future__ import annotations

import json

import jax
import numpy as np

from dual_diffusion.evaluation.suites import training_sample_options
from dual_diffusion.inference.pipelines import Pipeline
from dual_diffusion.checkpoints.paths import workdir_path
from dual_diffusion.training.state import Plan


def write_samples(out, step: int, images_NxHxWx3_uint8: np.ndarray, captions: dict) -> None:
    """OUT/step_<step>_images.png (the N images in a row) and OUT/step_<step>_captions.json; OUT is any
    epath (PIL writes to a file object, so a gs:// folder works like a local one)."""
    from PIL import Image

    out = workdir_path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"step_{step}_images.png").open("wb") as f:
        Image.fromarray(np.concatenate(list(images_NxHxWx3_uint8), axis=1)).save(f, format="PNG")
    (out / f"step_{step}_captions.json").write_text(json.dumps(captions, indent=2))


class Sampler:
    def __init__(self, config, plan: Plan, tokenizer, workdir, loss_cfg):
        self.config = config
        self.workdir = None if workdir is None else workdir_path(workdir)
        self.split = plan.split
        graphdefs = plan.split.graphdefs
        vae = config.model.vae
        in_vae = "vae" in graphdefs
        self.pipeline = Pipeline(graphdefs, tokenizer, text_length=int(config.data.text_length),
                                 image_size=int(config.data.image_size),
                                 vae_shift=vae.shift_factor if in_vae else 0.0,
                                 vae_scale=vae.scaling_factor if in_vae else 1.0)
        # One definition (config.samples + config.loss's text schedule), shared with
        # `evaluate --preset=demo`, which reads the same values from WORKDIR/config.json.
        self.image_opts, self.text_opts = training_sample_options(config)

    def states(self, state: dict, frozen: dict) -> dict:
        """Per-network pure state dicts: frozen weights overlaid with the trained (EMA) ones, T5's mask row
        folded into its table."""
        weights = state["ema"] if state.get("ema") is not None else state["params"]
        return self.split.network_states(weights, frozen)

    def write(self, step: int, state, frozen) -> None:
        """Image row for the config's prompts + captions of fixed shapes images, under WORKDIR/samples."""
        from dual_diffusion.data.shapes import world_of_run
        from dual_diffusion.data.shapes_eval import caption_eval_set

        states = self.states(state, frozen)
        prompts = list(self.config.samples.prompts)
        images = self.pipeline.text_to_image(states, prompts, opts=self.image_opts)
        fixed = caption_eval_set(1234, int(self.config.samples.num_caption_images), self.pipeline.image_size,
                                 world_of_run(self.config))
        caps = self.pipeline.caption(states, fixed.images, opts=self.text_opts)
        if jax.process_index() != 0 or self.workdir is None:
            return
        out = self.workdir / "samples"
        write_samples(out, step, np.asarray(images), {"prompts": prompts, "captions": caps, "truth": fixed.captions})
        from dual_diffusion.training.metrics import console
        console(f"samples for step {step} written to {out}/step_{step}_images.png and step_{step}_captions.json")

    def shapes_suite(self, state, frozen) -> dict:
        """Scores on the built-in shapes world: t2i (per category), caption attributes, VQA accuracy."""
        from dual_diffusion.evaluation.suites import shapes_suite, training_suite_settings

        return shapes_suite(self.pipeline, self.states(state, frozen), **training_suite_settings(self.config),
                            progress=jax.process_index() == 0)  # tqdm bars on stderr
