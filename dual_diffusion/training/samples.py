"""Periodic samples during training, and the shapes-suite scores at the end of the demo.

Samples use the EMA weights when there are any. Written to
WORKDIR/samples/step_<N>_images.png (one image per fixed prompt, in a row) and
WORKDIR/samples/step_<N>_captions.json (captions of fixed shapes-world images),
plus the same in TensorBoard (process 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dual_diffusion.diffusion.image_sampling import sample_images
from dual_diffusion.diffusion.masked import Schedule
from dual_diffusion.diffusion.text_sampling import sample_text
from dual_diffusion.training.state import Plan


def _to_uint8(images):
    return np.asarray(jnp.clip((images + 1.0) * 127.5, 0, 255).round()).astype(np.uint8)


class Sampler:
    def __init__(self, config, plan: Plan, tokenizer, workdir, loss_cfg):
        self.config, self.plan, self.tok, self.loss_cfg = config, plan, tokenizer, loss_cfg
        self.workdir = None if workdir is None else Path(workdir)
        self.image_size, self.length = int(config.data.image_size), int(config.data.text_length)
        vae = config.model.vae
        self.shift, self.scale = vae.shift_factor, vae.scaling_factor
        self._gen_images = jax.jit(self._images_fn, static_argnames=("steps", "cfg_scale"))
        self._gen_text = jax.jit(self._text_fn, static_argnames=("steps", "method", "min_new_tokens"))

    # ---- networks
    def _nets(self, params, frozen):
        split = self.plan.split
        return split.merge("transformer", params, frozen), split.merge("text_encoder", params, frozen), (
            split.merge("vae", params, frozen) if "vae" in split.graphdefs else None)

    def _encode(self, vae, images):
        return images if vae is None else (vae.encode(images) - self.shift) * self.scale

    def _decode(self, vae, latents):
        return latents if vae is None else vae.decode(latents / self.scale + self.shift)

    def _images_fn(self, params, frozen, ids, null_ids, noise, *, steps, cfg_scale):
        mmdit, t5, vae = self._nets(params, frozen)
        velocity = lambda x, hidden, t: mmdit(x, hidden, t)[0]
        latents = sample_images(velocity, noise, t5(ids), t5(null_ids), steps=steps, cfg_scale=cfg_scale)
        return jnp.clip(self._decode(vae, latents), -1.0, 1.0)

    def _text_fn(self, params, frozen, images, ids, fixed, rng, *, steps, method, min_new_tokens):
        mmdit, t5, vae = self._nets(params, frozen)
        clean = self._encode(vae, images)
        zeros = jnp.zeros((images.shape[0],), jnp.float32)
        logits_fn = lambda x: mmdit(clean, t5(x), zeros)[1]
        schedule = Schedule(self.loss_cfg.text_schedule, self.loss_cfg.text_eps)
        return sample_text(logits_fn, ids, fixed, rng, method=method, steps=steps, mask_id=self.plan.mask_id,
                           schedule=schedule, eos_id=self.tok.eos_id, min_new_tokens=min_new_tokens)

    def _weights(self, state):
        return state["ema"] if state.get("ema") is not None else state["params"]

    # ---- public
    def images(self, state, frozen, prompts: list[str], seed: int = 0) -> np.ndarray:
        ids = jnp.asarray(self.tok.encode_batch(list(prompts), self.length, pad_id=self.tok.eos_id))
        null_ids = jnp.full_like(ids, self.tok.eos_id)
        shape = jax.eval_shape(lambda: self._encode_shape(state, frozen))
        noise = jax.random.normal(jax.random.key(seed), (len(prompts),) + tuple(shape.shape[1:]), jnp.float32)
        out = self._gen_images(self._weights(state), frozen, ids, null_ids, noise,
                               steps=int(self.config.samples.image_steps),
                               cfg_scale=float(self.config.samples.cfg_scale))
        return _to_uint8(out)

    def _encode_shape(self, state, frozen):
        _, _, vae = self._nets(self._weights(state), frozen)
        return self._encode(vae, jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32))

    def fill_text(self, state, frozen, images_uint8: np.ndarray, ids: np.ndarray, fixed: np.ndarray,
                  seed: int = 0) -> np.ndarray:
        images = jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0
        out = self._gen_text(self._weights(state), frozen, images, jnp.asarray(ids), jnp.asarray(fixed),
                             jax.random.key(seed), steps=int(self.config.samples.text_steps),
                             method=str(self.config.samples.text_method),
                             min_new_tokens=int(self.config.samples.min_new_tokens))
        return np.asarray(out[0] if isinstance(out, tuple) else out)

    def _decode_free(self, ids_row, fixed_row) -> str:
        free = [int(i) for i in ids_row[~fixed_row]]
        if self.tok.eos_id in free:
            free = free[: free.index(self.tok.eos_id)]
        return self.tok.decode(free).strip()

    def captions(self, state, frozen, images_uint8: np.ndarray) -> list[str]:
        n = len(images_uint8)
        ids = np.full((n, self.length), self.plan.mask_id, np.int32)
        fixed = np.zeros((n, self.length), bool)
        out = self.fill_text(state, frozen, images_uint8, ids, fixed)
        return [self._decode_free(r, f) for r, f in zip(out, fixed)]

    def answers(self, state, frozen, images_uint8: np.ndarray, questions: list[str]) -> list[str]:
        from dual_diffusion.data.text_layout import vqa_layout
        layouts = [vqa_layout(self.tok, q, "", self.length) for q in questions]
        ids = np.stack([l.text_ids for l in layouts])
        fixed = np.stack([l.fixed_mask for l in layouts])
        out = self.fill_text(state, frozen, images_uint8, ids, fixed)
        return [self._decode_free(r, f) for r, f in zip(out, fixed)]

    def write(self, step: int, state, frozen) -> None:
        """Image row for the config's prompts + captions of fixed shapes images, under WORKDIR/samples."""
        from PIL import Image

        from dual_diffusion.data.shapes_eval import caption_eval_set

        images = self.images(state, frozen, list(self.config.samples.prompts))
        fixed = caption_eval_set(1234, int(self.config.samples.num_caption_images), self.image_size)
        caps = self.captions(state, frozen, fixed.images)
        if jax.process_index() != 0 or self.workdir is None:
            return
        out = self.workdir / "samples"
        out.mkdir(exist_ok=True)
        Image.fromarray(np.concatenate(list(images), axis=1)).save(out / f"step_{step}_images.png")
        (out / f"step_{step}_captions.json").write_text(json.dumps(
            {"prompts": list(self.config.samples.prompts), "captions": caps, "truth": fixed.captions}, indent=2))

    def shapes_suite(self, state, frozen) -> dict:
        """Scores on the built-in shapes world: t2i (per category), caption attributes, VQA accuracy."""
        from dual_diffusion.data import shapes_eval

        n = int(self.config.eval.shapes_suite_size)
        specs = shapes_eval.t2i_prompt_set(4321, max(1, n // len(shapes_eval.CATEGORIES)))
        images = np.concatenate([self.images(state, frozen, [s.prompt for s in specs[i:i + n]], seed=i)
                                 for i in range(0, len(specs), n)])
        caps = shapes_eval.caption_eval_set(4322, n, self.image_size)
        vqa = shapes_eval.vqa_eval_set(4323, n, self.image_size)
        return {"t2i": shapes_eval.evaluate_t2i(images, specs),
                "captions": shapes_eval.evaluate_captions(self.captions(state, frozen, caps.images), caps.scenes),
                "vqa": shapes_eval.evaluate_vqa(self.answers(state, frozen, vqa.images, vqa.questions),
                                                vqa.answers)}
