"""Inference pipelines: text to image, in-painting, captioning and VQA over the three networks.

One `Pipeline` serves `dual_diffusion.sample`, `dual_diffusion.evaluate` and the
trainer's periodic samples. It holds graphdefs only; the network states are
arguments of every call (converted weights, a workdir's EMA weights, or the live
training state), so each jitted function compiles once per shape.

Latent space: with a VAE, latents are (mean - shift) * scale (REFERENCE.md, VAE);
without one ("pixels", the CPU demo) the [-1, 1] image itself is the latent.
Text: prompts are T5-tokenized and padded to `text_length` as the release's pipeline
does (`padding="max_length"`, truncation with a warning; T5 then runs without an
attention mask, so the pad id matters): with the pad token a converted checkpoint's
tokenizer folder declares, with EOS for a training workdir (as it trained; the
release's training scripts set pad = EOS), or as `prompt_padding` says. Captions
start all-masked; VQA fixes `Q: {question} Answer the question using a
single word or phrase. A: ` and generates the rest (REFERENCE.md, Inference).
Caption and VQA rows have their own lengths: the release's 128 tokens, or the
length the model trained at when shorter (`Pipeline.from_bundle`); their default
steps are the release's, TEXT_STEPS. Generated ids become text by one of
DECODINGS (`decode_text`). Text decoding: TextOptions (method, threshold, image_cache,
...); every call's network calls per row are tallied in `Pipeline.text_calls`.

Randomness is per item: row i of a call draws its noise, tokens and posterior sample from
fold_in(key(seed), indices[i]) (diffusion/row_keys.py; indices default to 0..B-1), so an
item's output depends on the seed and its index only, not on its batch or on how the batch
is split. With a `mesh` every call runs on it (inference/sharded.py): rows padded to a
multiple of the batch shards and split over them, activations pinned by the logical rules,
each process feeding its own rows and every process receiving the whole result.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from dual_diffusion import sharding
from dual_diffusion.data.text_layout import vqa_layout
from dual_diffusion.diffusion import row_keys
from dual_diffusion.diffusion.image_sampling import GRIDS, sample_images
from dual_diffusion.diffusion.masked import Schedule
from dual_diffusion.diffusion.text_sampling import METHODS, CachedLogits, sample_text
from dual_diffusion.inference import sharded
from dual_diffusion.tokenizer import EOS_ID, Tokenizer, declared_pad_token

States = Mapping[str, Any]  # {"transformer", "text_encoder"[, "vae"]} -> nnx.State

# The release's image-to-text sampling: 128-token rows for captions and VQA (its pipeline's
# `sequence_length` and its VQA script's sampler length), 64 steps for captions (the pipeline's
# default) and 32 for VQA (the script's `--sample_steps`).
RELEASE_TEXT_LENGTH = 128
TEXT_STEPS = {"caption": 64, "vqa": 32}
DECODINGS = ("first_eos", "release")
IMAGE_LATENTS = ("mean", "sample")
PROMPT_PADDINGS = ("eos", "declared")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """Flow ODE sampling (REFERENCE.md, Inference: Euler, 28 steps, shift 3, CFG 7).

    grid: "diffusers" (the release's scheduler levels) or "linspace" (image_sampling.time_grid).
    """

    steps: int = 28
    cfg_scale: float = 7.0
    shift: float = 3.0
    method: str = "euler"
    grid: str = "diffusers"

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise ValueError(f"ImageOptions: grid={self.grid!r}; expected one of {GRIDS}")


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """Masked-diffusion text sampling (see diffusion/text_sampling.py for each option).

    method: one of text_sampling.METHODS; "threshold" reveals, block by block, every token
      whose probability is >= `threshold` (at least one per step), or with `factor` the
      factor rule (Fast-dLLM); `num_blocks` blocks (semi_ar, threshold).
    image_cache: None (off) or R: the image's per-layer keys and values are computed by a
      full pass and reused by text-only passes, refreshed every R network calls (0: never)
      and at each block start (an approximation; R = 1 is the uncached sampler).
    decoding: how generated ids become text, one of DECODINGS (`decode_text`).
    image_latents: "mean" (the VAE posterior mean) or "sample" (a posterior draw, as the
      release's pipeline and VQA script condition on); no effect in pixel space.
    """

    steps: int = 64
    method: str = "ancestral"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    num_blocks: int = 4
    cfg_scale: float = 1.0  # > 1: guidance over the image condition (null image as unconditional)
    schedule: Schedule = Schedule()  # the masking schedule the model was trained with
    decoding: str = "first_eos"
    image_latents: str = "mean"
    threshold: float = 0.9
    factor: float | None = None
    image_cache: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"TextOptions: method={self.method!r}; expected one of {METHODS}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"TextOptions: threshold={self.threshold}; expected 0 < threshold <= 1")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"TextOptions: factor={self.factor}; expected > 0 (or None: the threshold rule)")
        if self.image_cache is not None and self.image_cache < 0:
            raise ValueError(f"TextOptions: image_cache={self.image_cache}; expected None (off) or R >= 0")
        if self.decoding not in DECODINGS:
            raise ValueError(f"TextOptions: decoding={self.decoding!r}; expected one of {DECODINGS}")
        if self.image_latents not in IMAGE_LATENTS:
            raise ValueError(f"TextOptions: image_latents={self.image_latents!r}; expected one of {IMAGE_LATENTS}")


def decode_text(tokenizer: Tokenizer, ids: Sequence[int], *, task: str = "caption",
                decoding: str = "first_eos") -> str:
    """The text of generated ids (the free positions of one row, in order).

    "first_eos" (this project's default): the ids before the first EOS, special tokens
      dropped, outer spaces stripped.
    "release": what the release's code returns. Captions (its pipeline): the whole
      sequence decoded with special tokens written out (transformers' default) and every
      `</s>` removed, so words after the first EOS stay. VQA (its VQA script): the same
      decoding cut before the first `</s>`; with no `</s>` at all the script's
      `text[:text.find(...)]` drops the last character, kept here as it is.
    """
    ids = [int(i) for i in ids]
    if decoding == "first_eos":
        if tokenizer.eos_id in ids:
            ids = ids[: ids.index(tokenizer.eos_id)]
        return tokenizer.decode(ids).strip()
    if decoding != "release":
        raise ValueError(f"decode_text: decoding={decoding!r}; expected one of {DECODINGS}")
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if task == "caption":
        return text.replace("</s>", "")
    if task == "vqa":
        return text[: text.find("</s>")]
    raise ValueError(f"decode_text: task={task!r}; expected 'caption' or 'vqa'")


def _uint8(images_BxHxWx3) -> jax.Array:
    """[-1, 1] float images -> uint8 (traced)."""
    return jnp.clip((images_BxHxWx3 + 1.0) * 127.5, 0, 255).round().astype(jnp.uint8)



def to_float(images_uint8) -> jax.Array:
    """uint8 images -> float32 in [-1, 1]."""
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


class Pipeline:
    """Generation with D-DiT; see the module docstring.

    graphdefs: "transformer", "text_encoder" and, unless latents are pixels, "vae".
    text_length: L of prompt rows (text to image, in-painting); caption_text_length and
    vqa_text_length: L of caption and VQA rows (default text_length); image_size: side
    of generated images. mesh, rules: where the calls run (inference/sharded.py; the
    states must live on the same mesh); None: the default device, inputs placed by jit.
    pad_id: the id prompt rows are padded with (default EOS).
    text_calls: {"caption" | "vqa": [network calls of each row decoded so far]}.
    """

    def __init__(self, graphdefs: Mapping[str, nnx.GraphDef], tokenizer: Tokenizer, *, text_length: int,
                 image_size: int, vae_shift: float = 0.0, vae_scale: float = 1.0,
                 caption_text_length: int | None = None, vqa_text_length: int | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules: Sequence | None = None,
                 pad_id: int = EOS_ID):
        missing = {"transformer", "text_encoder"} - set(graphdefs)
        if missing:
            raise KeyError(f"Pipeline: networks {sorted(missing)} missing; have {sorted(graphdefs)}")
        self.graphdefs = dict(graphdefs)
        self.tokenizer = tokenizer
        self.text_length, self.image_size = int(text_length), int(image_size)
        self.caption_text_length = int(caption_text_length or text_length)
        self.vqa_text_length = int(vqa_text_length or text_length)
        self.vae_shift, self.vae_scale = float(vae_shift), float(vae_scale)
        self.mesh = mesh
        self.rules = tuple(tuple(r) for r in (rules or sharding.DEFAULT_RULES)) if mesh is not None else None
        self.batch_multiple = sharded.batch_multiple(mesh, self.rules)
        self._latent_shape: tuple[int, ...] | None = None
        self.pad_id = int(pad_id)
        self.text_calls: dict[str, list[int]] = {"caption": [], "vqa": []}
        self._images = jax.jit(self._images_fn, static_argnames=("opts", "latent_shape"))
        self._text = jax.jit(self._text_fn, static_argnames=("opts",))
        self._encode = jax.jit(self._encode_fn)

    @classmethod
    def from_bundle(cls, bundle, *, image_size: int | None = None, text_length: int | None = None,
                    mesh: jax.sharding.Mesh | None = None, rules: Sequence | None = None,
                    prompt_padding: str | None = None) -> "Pipeline":
        """A pipeline over `load_pretrained`'s networks.

        Sizes default to what a training workdir trained at, else the release's
        sampling sizes: 512 px, 256-token prompts, and for captions and VQA its 128
        tokens whatever the training length (capped at a workdir's trained length,
        which a from-scratch model's text position table may not exceed). An explicit
        `text_length` sets every row length. prompt_padding (PROMPT_PADDINGS): "declared"
        (the default for a converted checkpoint: the pad token its tokenizer folder
        declares, as the release's pipeline) or "eos" (the default for a training workdir,
        as it trained). Returns the pipeline; pass `bundle.states` to its calls (loaded
        with the same `mesh` and `rules`).
        """
        info = bundle.info
        trained = info.get("text_length")
        image_size = image_size or info.get("image_size") or 512
        task_length = text_length or min(RELEASE_TEXT_LENGTH, trained or RELEASE_TEXT_LENGTH)
        text_length = text_length or trained or 256
        vae = bundle.configs.get("vae")
        return cls(bundle.graphdefs, bundle.tokenizer, text_length=text_length, image_size=image_size,
                   vae_shift=vae.shift_factor if vae else 0.0, vae_scale=vae.scaling_factor if vae else 1.0,
                   caption_text_length=task_length, vqa_text_length=task_length, mesh=mesh, rules=rules,
                   pad_id=prompt_pad_id(bundle, prompt_padding))

    # ---- pure pieces (traced)
    def _nets(self, states: States):
        merge = lambda name: nnx.merge(self.graphdefs[name], states[name]) if name in self.graphdefs else None
        return merge("transformer"), merge("text_encoder"), merge("vae")

    def _to_latents(self, vae, images):
        return images if vae is None else (vae.encode(images) - self.vae_shift) * self.vae_scale

    def _from_latents(self, vae, latents):
        return latents if vae is None else vae.decode(latents / self.vae_scale + self.vae_shift)

    def _image_condition(self, vae, images, rng, image_latents: str):
        """(latents, rng) of the clean image a caption / answer is conditioned on: the posterior mean,
        or ("sample", as the release) a posterior draw, with the key it used split off rng (one key,
        or one per row)."""
        if vae is None or image_latents == "mean":
            return self._to_latents(vae, images), rng
        from dual_diffusion.models.vae import sample_posterior

        mean, logvar = vae.encode_moments(images)
        rng, key = row_keys.split(rng)
        draw = jax.vmap(sample_posterior) if row_keys.per_row(key) else sample_posterior
        return (draw(mean, logvar, key) - self.vae_shift) * self.vae_scale, rng

    def _encode_fn(self, states, images):
        return self._to_latents(self._nets(states)[2], images)

    def _images_fn(self, states, seed, indices, ids, null_ids, known_uint8, keep_masks, *, opts: ImageOptions,
                   latent_shape: tuple[int, ...]):
        mmdit, t5, vae = self._nets(states)
        velocity = lambda x, hidden, t: mmdit(x, hidden, t)[0]
        keys = row_keys.item_keys(seed, indices)
        noise = row_keys.draw(keys, lambda key, shape: jax.random.normal(key, shape, jnp.float32),
                              (ids.shape[0],) + latent_shape)
        inpaint = {} if known_uint8 is None else dict(inpaint_mask=self._latent_mask(keep_masks, latent_shape),
                                                      known_latents=self._to_latents(vae, to_float(known_uint8)))
        uncond = t5(null_ids) if opts.cfg_scale > 1.0 else None  # the release: CFG only when guidance > 1
        latents = sample_images(velocity, noise, t5(ids), uncond, steps=opts.steps, method=opts.method,
                                shift=opts.shift, cfg_scale=opts.cfg_scale, grid=opts.grid, **inpaint)
        return _uint8(self._from_latents(vae, latents))

    def _latent_mask(self, keep_masks_BxSxS, latent_shape):
        """(B, h, w, 1) bool: a latent cell is kept only if all its pixels are."""
        keep = keep_masks_BxSxS.astype(jnp.float32)[..., None]
        f = self.image_size // latent_shape[0]
        keep = -jax.lax.reduce_window(-keep, -jnp.inf, jax.lax.max, (1, f, f, 1), (1, f, f, 1), "VALID")
        return keep > 0.5

    def _text_fn(self, states, seed, indices, images_uint8, ids, fixed, *, opts: TextOptions):
        mmdit, t5, vae = self._nets(states)
        rng = row_keys.item_keys(seed, indices)
        clean, rng = self._image_condition(vae, to_float(images_uint8), rng, opts.image_latents)
        t0 = jnp.zeros((ids.shape[0],), jnp.float32)  # the image is clean: timestep 0
        if opts.image_cache is None:
            logits_fn = lambda x: mmdit(clean, t5(x), t0)[1]
        else:
            logits_fn = CachedLogits(lambda x: mmdit.logits_and_image_kv(clean, t5(x), t0),
                                     lambda x, image_kv: mmdit.text_logits(t5(x), t0, image_kv), opts.image_cache)
        uncond = (lambda x: mmdit(None, t5(x), t0)[1]) if opts.cfg_scale > 1.0 else None
        out, stats = sample_text(logits_fn, ids, fixed, rng, method=opts.method, steps=opts.steps,
                                 mask_id=self.tokenizer.mask_id, eos_id=self.tokenizer.eos_id,
                                 schedule=opts.schedule, temperature=opts.temperature, top_k=opts.top_k,
                                 top_p=opts.top_p, min_new_tokens=opts.min_new_tokens, num_blocks=opts.num_blocks,
                                 uncond_logits_fn=uncond, cfg_scale=opts.cfg_scale, threshold=opts.threshold,
                                 factor=opts.factor, return_stats=True)
        return out, stats["nfe_per_row"]

    # ---- text <-> ids
    def encode_prompts(self, prompts: Sequence[str], *, truncate: bool = True) -> np.ndarray:
        """(B, L) ids padded with `pad_id`, as the release's tokenizer call (`padding="max_length"`,
        `truncation=True`): a prompt longer than L keeps its first L - 1 tokens and EOS, with a warning
        naming it (truncate=False: a ValueError instead)."""
        L = self.text_length
        ids, cut = self.tokenizer.encode_batch(list(prompts), L, pad_id=self.pad_id, return_truncated=True)
        if cut:
            long = [(i, p, n) for i, p in enumerate(prompts) if (n := len(self.tokenizer.encode(p))) > L]
            i, prompt, n = long[0]
            what = f"prompt {i} ({prompt[:60]!r}) is {n} tokens with EOS; the model's text length is {L}"
            if not truncate:
                raise ValueError(what)
            logging.warning("%s%s: truncated to %d tokens, as the release's pipeline does",
                            what, f" (and {len(long) - 1} more prompts)" if len(long) > 1 else "", L)
        return ids.reshape(len(prompts), L)

    def decode_generated(self, ids_BxL, fixed_BxL, *, task: str = "caption",
                         decoding: str = "first_eos") -> list[str]:
        """The generated (non-fixed) part of each row as text (`decode_text`)."""
        return [decode_text(self.tokenizer, row[~fixed], task=task, decoding=decoding)
                for row, fixed in zip(np.asarray(ids_BxL), np.asarray(fixed_BxL))]

    def latent_shape(self, states: States) -> tuple[int, ...]:
        """(h, w, c) of one image's latents."""
        if self._latent_shape is None:
            probe = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
            self._latent_shape = tuple(jax.eval_shape(self._encode_fn, states, probe).shape[1:])
        return self._latent_shape

    # ---- placement: every call's rows padded, split over the mesh, gathered back
    def _call(self, fn, states: States, seed: int, indices, n: int, rows: Sequence, **static):
        """fn(states, seed, indices, *rows, **static) on n items; returns the host result's first n rows
        (of each output, when fn returns several).

        rows: per-row inputs, each an array, None, or (lazy reader, row shape, dtype) (sharded.put_rows).
        """
        take = sharded.padded_rows(n, self.batch_multiple)
        indices = np.arange(n) if indices is None else np.asarray(indices)
        if indices.shape != (n,):
            raise ValueError(f"indices of shape {indices.shape} for {n} rows")

        def put(row):
            source, shape, dtype = row if isinstance(row, tuple) else (row, None, None)
            return None if source is None else sharded.put_rows(source, take, self.mesh, self.rules, shape, dtype)

        seed = sharded.put_replicated(np.uint32(seed % 2 ** 32), self.mesh)
        with sharding.activation_sharding(self.mesh, self.rules):
            out = fn(states, seed, put(indices.astype(np.int32)), *map(put, rows), **static)
        return jax.tree.map(lambda x: sharded.fetch(x)[:n], out)

    def lower(self, task: str, states: States, batch: int, opts) -> jax.stages.Lowered:
        """One call of `task` ("t2i", "caption", "vqa") on `batch` rows (a multiple of the batch shards),
        lowered from abstract states and inputs (ShapeDtypeStructs on the mesh): compiled without running
        by aot/inference_report.py."""
        from jax.sharding import NamedSharding, PartitionSpec as P

        def rows(*shape, dtype):
            split = sharding.batch_sharding(self.mesh, self.rules, len(shape)) if self.mesh else None
            return jax.ShapeDtypeStruct(shape, dtype, sharding=split)

        seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=NamedSharding(self.mesh, P()) if self.mesh else None)
        head = (states, seed, rows(batch, dtype=jnp.int32))
        with sharding.activation_sharding(self.mesh, self.rules):
            if task == "t2i":
                ids = rows(batch, self.text_length, dtype=jnp.int32)
                return self._images.lower(*head, ids, ids, None, None, opts=opts,
                                          latent_shape=self.latent_shape(states))
            L = {"caption": self.caption_text_length, "vqa": self.vqa_text_length}[task]
            return self._text.lower(*head, rows(batch, self.image_size, self.image_size, 3, dtype=jnp.uint8),
                                    rows(batch, L, dtype=jnp.int32), rows(batch, L, dtype=jnp.bool_), opts=opts)

    # ---- public tasks. Images: uint8 (B, S, S, 3) arrays, or lazy row readers (`_call`).
    def text_to_image(self, states: States, prompts: Sequence[str], *, seed: int = 0, indices=None,
                      negative_prompts: Sequence[str] | None = None,
                      opts: ImageOptions = ImageOptions()) -> np.ndarray:
        """uint8 images (B, S, S, 3) for the prompts; CFG against the empty (or negative) prompt.
        Image i starts from noise keyed by (seed, indices[i]) (default indices: 0..B-1)."""
        negative = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        rows = (self.encode_prompts(prompts), self.encode_prompts(negative), None, None)
        return self._call(self._images, states, seed, indices, len(prompts), rows, opts=opts,
                          latent_shape=self.latent_shape(states))

    def inpaint(self, states: States, images_uint8, keep_masks, prompts: Sequence[str], *, seed: int = 0,
                indices=None, opts: ImageOptions = ImageOptions()) -> np.ndarray:
        """Regenerates where keep_masks (B, S, S) is False, keeps the rest; uint8 (B, S, S, 3)."""
        rows = (self.encode_prompts(prompts), self.encode_prompts([""] * len(prompts)), self._image_rows(images_uint8),
                np.asarray(keep_masks, bool))
        return self._call(self._images, states, seed, indices, len(prompts), rows, opts=opts,
                          latent_shape=self.latent_shape(states))

    def fill_text(self, states: States, images_uint8, ids_BxL, fixed_BxL, *, seed: int = 0, indices=None,
                  opts: TextOptions = TextOptions(), task: str | None = None) -> np.ndarray:
        """Generates the non-fixed positions of ids given the images; (B, L) ids. Row i draws from the key
        of (seed, indices[i]) (default indices: 0..B-1). The network calls of each row are tallied under
        `task` ("caption", "vqa") in `text_calls`."""
        rows = (self._image_rows(images_uint8), np.asarray(ids_BxL, np.int32), np.asarray(fixed_BxL, bool))
        out, calls = self._call(self._text, states, seed, indices, len(ids_BxL), rows, opts=opts)
        if task is not None:
            self.text_calls[task].extend(int(c) for c in calls)
        return out

    def mean_text_calls(self, task: str) -> float | None:
        """Mean network calls per decoded row of `task` so far (None before any)."""
        calls = self.text_calls[task]
        return float(np.mean(calls)) if calls else None

    def _image_rows(self, images):
        """An images argument as `_call` takes it: arrays as they are, a lazy reader with its row shape."""
        if isinstance(images, (np.ndarray, jax.Array, list, tuple)):
            return np.asarray(images, np.uint8)
        return images, (self.image_size, self.image_size, 3), np.uint8

    def caption(self, states: States, images_uint8, *, seed: int = 0, indices=None, length: int | None = None,
                opts: TextOptions = TextOptions(steps=TEXT_STEPS["caption"])) -> list[str]:
        """Captions of uint8 images (B, S, S, 3) in rows of caption_text_length tokens; `length`
        generated tokens at most (default the whole row, as the release)."""
        ids, fixed = self.caption_rows(len(images_uint8), length)
        out = self.fill_text(states, images_uint8, ids, fixed, seed=seed, indices=indices, opts=opts, task="caption")
        return self.decode_generated(out, fixed, task="caption", decoding=opts.decoding)

    def caption_rows(self, n: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, fixed), each (n, caption_text_length): `length` generated positions (default all), the
        rest fixed EOS padding, so the caption ends in time."""
        L = self.caption_text_length
        length = L if length is None else int(length)
        if not 1 <= length <= L:
            raise ValueError(f"caption length {length}; expected 1..{L}")
        fixed = np.zeros((n, L), bool)
        fixed[:, length:] = True
        return np.full((n, L), self.tokenizer.eos_id, np.int32), fixed

    def vqa_rows(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, fixed), each (B, vqa_text_length): the release's VQA in-filling layout."""
        L = self.vqa_text_length
        layouts = []
        for q in questions:
            layout = vqa_layout(self.tokenizer, q, "", L)
            if layout.truncated or layout.fixed_mask.all():
                raise ValueError(f"question {q[:60]!r} leaves no room for an answer in {L} tokens")
            layouts.append(layout)
        return np.stack([l.text_ids for l in layouts]), np.stack([l.fixed_mask for l in layouts])

    def answer(self, states: States, images_uint8, questions: Sequence[str], *, seed: int = 0, indices=None,
               opts: TextOptions = TextOptions(steps=TEXT_STEPS["vqa"])) -> list[str]:
        """Short answers to one question per image (the release's VQA in-filling layout)."""
        if len(questions) != len(images_uint8):
            raise ValueError(f"{len(questions)} questions for {len(images_uint8)} images")
        ids, fixed = self.vqa_rows(questions)
        out = self.fill_text(states, images_uint8, ids, fixed, seed=seed, indices=indices, opts=opts, task="vqa")
        return self.decode_generated(out, fixed, task="vqa", decoding=opts.decoding)


def prompt_pad_id(bundle, prompt_padding: str | None = None) -> int:
    """The id prompts are padded with (`Pipeline.from_bundle`): "declared" (default for a converted
    checkpoint) reads the pad token its converter recorded (or, converted before it recorded one, the one
    its tokenizer folder declares); "eos" (default for a training workdir)."""
    from dual_diffusion.convert.components import FORMAT

    if prompt_padding is not None and prompt_padding not in PROMPT_PADDINGS:
        raise ValueError(f"prompt_padding={prompt_padding!r}; expected one of {PROMPT_PADDINGS}")
    converted = bundle.info.get("format") == FORMAT
    if (prompt_padding or ("declared" if converted else "eos")) == "eos":
        return EOS_ID
    recorded = bundle.info.get("tokenizer", {}) if converted else {}  # a workdir's "tokenizer" is its model path
    if "pad_id" in recorded:
        return int(recorded["pad_id"])
    token, _ = declared_pad_token(bundle.tokenizer.model_file.parent)
    return bundle.tokenizer.token_id(token)
