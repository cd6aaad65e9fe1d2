"""Inference pipelines: text to image, in-painting, captioning and VQA over the three networks.

One `Pipeline` serves `dual_diffusion.sample`, `dual_diffusion.evaluate` and the
trainer's periodic samples. It holds graphdefs only; the network states are
arguments of every call (converted weights, a workdir's EMA weights, or the live
training state), so each jitted function compiles once per shape.

Latent space: with a VAE, latents are (mean - shift) * scale (REFERENCE.md, VAE);
without one ("pixels", the CPU demo) the [-1, 1] image itself is the latent.
Text: prompts are T5-tokenized, EOS-padded to `text_length` as the release does;
captions start all-masked; VQA fixes `Q: {question} Answer the question using a
single word or phrase. A: ` and generates the rest (REFERENCE.md, Inference).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dual_diffusion.data.text_layout import vqa_layout
from dual_diffusion.diffusion.image_sampling import sample_images
from dual_diffusion.diffusion.masked import Schedule
from dual_diffusion.diffusion.text_sampling import sample_text
from dual_diffusion.tokenizer import Tokenizer

States = Mapping[str, Any]  # {"transformer", "text_encoder"[, "vae"]} -> nnx.State


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """Flow ODE sampling (REFERENCE.md, Inference: Euler, 28 steps, shift 3, CFG 7)."""

    steps: int = 28
    cfg_scale: float = 7.0
    shift: float = 3.0
    method: str = "euler"


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """Masked-diffusion text sampling (see diffusion/text_sampling.py for each option)."""

    steps: int = 64
    method: str = "ancestral"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    num_blocks: int = 4
    cfg_scale: float = 1.0  # > 1: guidance over the image condition (null image as unconditional)
    schedule: Schedule = Schedule()  # the masking schedule the model was trained with


def to_uint8(images_BxHxWx3) -> np.ndarray:
    """[-1, 1] float images -> uint8."""
    return np.asarray(jnp.clip((jnp.asarray(images_BxHxWx3) + 1.0) * 127.5, 0, 255).round()).astype(np.uint8)


def to_float(images_uint8) -> jax.Array:
    """uint8 images -> float32 in [-1, 1]."""
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


class Pipeline:
    """Generation with D-DiT; see the module docstring.

    graphdefs: "transformer", "text_encoder" and, unless latents are pixels, "vae".
    text_length: L of every text sequence; image_size: side of generated images.
    """

    def __init__(self, graphdefs: Mapping[str, nnx.GraphDef], tokenizer: Tokenizer, *, text_length: int,
                 image_size: int, vae_shift: float = 0.0, vae_scale: float = 1.0):
        missing = {"transformer", "text_encoder"} - set(graphdefs)
        if missing:
            raise KeyError(f"Pipeline: networks {sorted(missing)} missing; have {sorted(graphdefs)}")
        self.graphdefs = dict(graphdefs)
        self.tokenizer = tokenizer
        self.text_length, self.image_size = int(text_length), int(image_size)
        self.vae_shift, self.vae_scale = float(vae_shift), float(vae_scale)
        self._images = jax.jit(self._images_fn, static_argnames=("opts",))
        self._text = jax.jit(self._text_fn, static_argnames=("opts",))
        self._encode = jax.jit(self._encode_fn)

    @classmethod
    def from_bundle(cls, bundle, *, image_size: int | None = None, text_length: int | None = None) -> "Pipeline":
        """A pipeline over `load_pretrained`'s networks.

        Sizes default to what a training workdir trained at, else the release's
        stage-2 sampling sizes (512 px, 256 tokens). Returns the pipeline; pass
        `bundle.states` to its calls.
        """
        info = bundle.info
        image_size = image_size or info.get("image_size") or 512
        text_length = text_length or info.get("text_length") or 256
        vae = bundle.configs.get("vae")
        return cls(bundle.graphdefs, bundle.tokenizer, text_length=text_length, image_size=image_size,
                   vae_shift=vae.shift_factor if vae else 0.0, vae_scale=vae.scaling_factor if vae else 1.0)

    # ---- pure pieces (traced)
    def _nets(self, states: States):
        merge = lambda name: nnx.merge(self.graphdefs[name], states[name]) if name in self.graphdefs else None
        return merge("transformer"), merge("text_encoder"), merge("vae")

    def _to_latents(self, vae, images):
        return images if vae is None else (vae.encode(images) - self.vae_shift) * self.vae_scale

    def _from_latents(self, vae, latents):
        return latents if vae is None else vae.decode(latents / self.vae_scale + self.vae_shift)

    def _encode_fn(self, states, images):
        return self._to_latents(self._nets(states)[2], images)

    def _images_fn(self, states, ids, null_ids, noise, known, known_mask, *, opts: ImageOptions):
        mmdit, t5, vae = self._nets(states)
        velocity = lambda x, hidden, t: mmdit(x, hidden, t)[0]
        inpaint = {} if known is None else dict(inpaint_mask=known_mask,
                                                known_latents=self._to_latents(vae, known))
        latents = sample_images(velocity, noise, t5(ids), t5(null_ids), steps=opts.steps, method=opts.method,
                                shift=opts.shift, cfg_scale=opts.cfg_scale, **inpaint)
        return jnp.clip(self._from_latents(vae, latents), -1.0, 1.0)

    def _text_fn(self, states, images, ids, fixed, rng, *, opts: TextOptions):
        mmdit, t5, vae = self._nets(states)
        clean = self._to_latents(vae, images)
        t0 = jnp.zeros((ids.shape[0],), jnp.float32)  # the image is clean: timestep 0
        logits_fn = lambda x: mmdit(clean, t5(x), t0)[1]
        uncond = (lambda x: mmdit(None, t5(x), t0)[1]) if opts.cfg_scale != 1.0 else None
        return sample_text(logits_fn, ids, fixed, rng, method=opts.method, steps=opts.steps,
                           mask_id=self.tokenizer.mask_id, eos_id=self.tokenizer.eos_id, schedule=opts.schedule,
                           temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                           min_new_tokens=opts.min_new_tokens, num_blocks=opts.num_blocks,
                           uncond_logits_fn=uncond, cfg_scale=opts.cfg_scale)

    # ---- text <-> ids
    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, L) ids, EOS-padded; a prompt longer than L is an error naming it."""
        rows = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt)
            if len(ids) > self.text_length:
                raise ValueError(f"prompt {i} ({prompt[:60]!r}) is {len(ids)} tokens with EOS; the model's text "
                                 f"length is {self.text_length}")
            rows.append(ids + [self.tokenizer.eos_id] * (self.text_length - len(ids)))
        return np.asarray(rows, np.int32).reshape(len(prompts), self.text_length)

    def decode_generated(self, ids_BxL, fixed_BxL) -> list[str]:
        """The generated (non-fixed) part of each row, up to its first EOS, as text."""
        out = []
        for row, fixed in zip(np.asarray(ids_BxL), np.asarray(fixed_BxL)):
            free = [int(i) for i in row[~fixed]]
            if self.tokenizer.eos_id in free:
                free = free[: free.index(self.tokenizer.eos_id)]
            out.append(self.tokenizer.decode(free).strip())
        return out

    def latent_shape(self, states: States) -> tuple[int, ...]:
        """(h, w, c) of one image's latents."""
        probe = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return tuple(jax.eval_shape(self._encode_fn, states, probe).shape[1:])

    # ---- public tasks
    def text_to_image(self, states: States, prompts: Sequence[str], *, seed: int = 0,
                      negative_prompts: Sequence[str] | None = None,
                      opts: ImageOptions = ImageOptions()) -> np.ndarray:
        """uint8 images (B, S, S, 3) for the prompts; CFG against the empty (or negative) prompt."""
        ids = self.encode_prompts(prompts)
        negative = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        noise = jax.random.normal(jax.random.key(seed), (len(prompts),) + self.latent_shape(states), jnp.float32)
        out = self._images(states, ids, self.encode_prompts(negative), noise, None, None, opts=opts)
        return to_uint8(out)

    def inpaint(self, states: States, images_uint8, keep_masks, prompts: Sequence[str], *, seed: int = 0,
                opts: ImageOptions = ImageOptions()) -> np.ndarray:
        """Regenerates where keep_masks (B, S, S) is False, keeps the rest; uint8 (B, S, S, 3)."""
        images = to_float(images_uint8)
        shape = self.latent_shape(states)
        keep = jnp.asarray(keep_masks, jnp.float32)[..., None]
        # The mask lives in latent resolution: a latent cell is kept only if all its pixels are.
        factor = self.image_size // shape[0]
        keep = -jax.lax.reduce_window(-keep, -jnp.inf, jax.lax.max, (1, factor, factor, 1),
                                      (1, factor, factor, 1), "VALID")
        noise = jax.random.normal(jax.random.key(seed), (len(prompts),) + shape, jnp.float32)
        out = self._images(states, self.encode_prompts(prompts), self.encode_prompts([""] * len(prompts)), noise,
                           images, keep > 0.5, opts=opts)
        return to_uint8(out)

    def fill_text(self, states: States, images_uint8, ids_BxL, fixed_BxL, *, seed: int = 0,
                  opts: TextOptions = TextOptions()) -> np.ndarray:
        """Generates the non-fixed positions of ids given the images; (B, L) ids."""
        out = self._text(states, to_float(images_uint8), jnp.asarray(ids_BxL, jnp.int32),
                         jnp.asarray(fixed_BxL, bool), jax.random.key(seed), opts=opts)
        return np.asarray(out)

    def caption(self, states: States, images_uint8, *, seed: int = 0, length: int | None = None,
                opts: TextOptions = TextOptions()) -> list[str]:
        """Captions of uint8 images (B, S, S, 3); `length` generated tokens at most (default all L)."""
        n, length = len(images_uint8), self.text_length if length is None else int(length)
        if not 1 <= length <= self.text_length:
            raise ValueError(f"caption length {length}; expected 1..{self.text_length}")
        # Positions beyond `length` are fixed EOS padding, so the caption ends in time.
        ids = np.full((n, self.text_length), self.tokenizer.eos_id, np.int32)
        fixed = np.zeros((n, self.text_length), bool)
        fixed[:, length:] = True
        return self.decode_generated(self.fill_text(states, images_uint8, ids, fixed, seed=seed, opts=opts), fixed)

    def answer(self, states: States, images_uint8, questions: Sequence[str], *, seed: int = 0,
               opts: TextOptions = TextOptions()) -> list[str]:
        """Short answers to one question per image (the release's VQA in-filling layout)."""
        if len(questions) != len(images_uint8):
            raise ValueError(f"{len(questions)} questions for {len(images_uint8)} images")
        layouts = []
        for q in questions:
            layout = vqa_layout(self.tokenizer, q, "", self.text_length)
            if layout.truncated or layout.fixed_mask.all():
                raise ValueError(f"question {q[:60]!r} leaves no room for an answer in {self.text_length} tokens")
            layouts.append(layout)
        ids = np.stack([l.text_ids for l in layouts])
        fixed = np.stack([l.fixed_mask for l in layouts])
        return self.decode_generated(self.fill_text(states, images_uint8, ids, fixed, seed=seed, opts=opts), fixed)

