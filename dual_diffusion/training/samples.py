"""Periodic samples during training, and the shapes-suite scores at the end of the demo.

A thin layer over dual_diffusion.pipelines: the train state's weights (EMA when
the run keeps one) plus the frozen weights make each network's state. Written to
WORKDIR/samples/step_<N>_images.png (one image per fixed prompt, in a row) and
WORKDIR/samples/step_<N>_captions.json (captions of fixed shapes-world images).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax.nnx import traversals

from dual_diffusion.diffusion.masked import Schedule
from dual_diffusion.pipelines import ImageOptions, Pipeline, TextOptions
from dual_diffusion.training.state import Plan


class Sampler:
    def __init__(self, config, plan: Plan, tokenizer, workdir, loss_cfg):
        self.config = config
        self.workdir = None if workdir is None else Path(workdir)
        graphdefs = plan.split.graphdefs
        vae = config.model.vae
        in_vae = "vae" in graphdefs
        self.pipeline = Pipeline(graphdefs, tokenizer, text_length=int(config.data.text_length),
                                 image_size=int(config.data.image_size),
                                 vae_shift=vae.shift_factor if in_vae else 0.0,
                                 vae_scale=vae.scaling_factor if in_vae else 1.0)
        s = config.samples
        self.image_opts = ImageOptions(steps=int(s.image_steps), cfg_scale=float(s.cfg_scale))
        self.text_opts = TextOptions(steps=int(s.text_steps), method=str(s.text_method),
                                     min_new_tokens=int(s.min_new_tokens),
                                     schedule=Schedule(loss_cfg.text_schedule, loss_cfg.text_eps))

    def states(self, state: dict, frozen: dict) -> dict:
        """Per-network pure state dicts: frozen weights overlaid with the trained (EMA) ones."""
        weights = state["ema"] if state.get("ema") is not None else state["params"]
        flat = lambda tree: traversals.flatten_mapping(tree) if tree else {}
        return {name: traversals.unflatten_mapping({**flat(frozen.get(name)), **flat(weights.get(name))})
                for name in self.pipeline.graphdefs}

    def write(self, step: int, state, frozen) -> None:
        """Image row for the config's prompts + captions of fixed shapes images, under WORKDIR/samples."""
        from PIL import Image

        from dual_diffusion.data.shapes_eval import caption_eval_set

        states = self.states(state, frozen)
        prompts = list(self.config.samples.prompts)
        images = self.pipeline.text_to_image(states, prompts, opts=self.image_opts)
        fixed = caption_eval_set(1234, int(self.config.samples.num_caption_images), self.pipeline.image_size)
        caps = self.pipeline.caption(states, fixed.images, opts=self.text_opts)
        if jax.process_index() != 0 or self.workdir is None:
            return
        out = self.workdir / "samples"
        out.mkdir(exist_ok=True)
        Image.fromarray(np.concatenate(list(images), axis=1)).save(out / f"step_{step}_images.png")
        (out / f"step_{step}_captions.json").write_text(json.dumps(
            {"prompts": prompts, "captions": caps, "truth": fixed.captions}, indent=2))

    def shapes_suite(self, state, frozen) -> dict:
        """Scores on the built-in shapes world: t2i (per category), caption attributes, VQA accuracy."""
        from dual_diffusion.data.shapes_eval import CATEGORIES
        from dual_diffusion.eval_suites import shapes_suite

        n = int(self.config.eval.shapes_suite_size)
        return shapes_suite(self.pipeline, self.states(state, frozen), seed=4321,
                            per_category=max(1, n // len(CATEGORIES)), num_captions=n, num_vqa=n, batch_size=n,
                            image_opts=self.image_opts, text_opts=self.text_opts, progress=False)
