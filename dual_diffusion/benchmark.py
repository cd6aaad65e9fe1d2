r"""Speed of D-DiT with random weights and synthetic inputs: train step, text to image, captioning, VQA, data.

  python -m dual_diffusion.benchmark --config=configs/stage2.py --what=train,t2i,caption [--batch=4]
  python -m dual_diffusion.benchmark --config=configs/demo.py --what=train --batch=2 --iters=1   # CPU, tiny

Prints one JSON line per measurement (stdout; logs go to stderr): seconds per call,
samples / images / tokens per second, FLOPs per call counted as the PyTorch anchor
counts them (dual_diffusion/flops.py), achieved TFLOP/s, MFU against an H100's
989.4 TFLOP/s bf16 dense peak (per device), peak device memory, lower + compile
time, and the config facts. Each call is compiled once ahead of time, run
`--warmup` times, then timed over `--iters` calls ending in block_until_ready.

The measured paths match /work/shared/bench/torch_anchor.py (run it on the same
machine in the same sitting, launch/bench_gpu.sh):
  train    the dual-loss step of training/step.py on latents (the VAE is not in
           the step, as in the anchor): T5 on the captions and on the masked ids,
           MM-DiT forward + backward of both halves, AdamW (+ EMA if configured).
  t2i      T5 on prompt and empty prompt, `--t2i_steps` Euler steps with CFG as one
           MM-DiT call on 2B rows per step (no VAE decode, as in the anchor).
  caption  `--caption_length` tokens from all-masked by each of `--sampler` in
           `--caption_steps` steps (the release: ancestral with caching, 128 / 64);
           `threshold+cache` is the threshold sampler with the image K/V cache. Rows
           after the first sampler's give `speedup`: its seconds over theirs, same run.
  vqa      the same network, `--vqa_prompt_tokens` fixed prompt ids, the rest of
           the text length generated in `--vqa_steps` steps.
  text_step  one decoding prediction at the caption length, in full (T5 + MM-DiT
           over image and text, returning the image K/V) and text-only over that
           cache: seconds and FLOPs of each and their ratios.
Random weights predict near-uniform text, so the threshold sampler reveals one token
per call, its worst case; `--confident_share` stands in for a trained model's
confidence (see its help).
  data     the input pipeline on synthetic JPEGs (data/bench.py), no device work.
Weights: abstract init + one jitted init (no checkpoint); the frozen T5 in
`--frozen_dtype`; the samplers cast the weights to the compute dtype once per
call. Peak memory is the process's peak so far: run one --what per process for
a clean figure (launch/bench_gpu.sh does).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import signal
import time

from absl import app, flags, logging
from ml_collections import config_flags

import dual_diffusion  # noqa: F401  (sets flax flags before any module is built)
import jax
import jax.numpy as jnp

from dual_diffusion import flops, sharding
from dual_diffusion.diffusion.image_sampling import sample_images
from dual_diffusion.diffusion.masked import Schedule
from dual_diffusion.diffusion.text_sampling import METHODS, CachedLogits, sample_text
from dual_diffusion.models.attention import resolve_impl
from dual_diffusion.models.configs import MMDiTConfig, T5Config
from dual_diffusion.training.loss import LossConfig
from dual_diffusion.training.state import make_plan, model_configs
from dual_diffusion.training.step import make_train_step

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]); --config.KEY=VALUE overrides.",
                                lock_config=True)
flags.DEFINE_string("what", "train,t2i,caption", "Comma list of train, t2i, caption, vqa, text_step, data.")
flags.DEFINE_string("batch", "", "Comma list of batch sizes for every --what; empty: the anchor's sizes "
                    "(train 4, t2i 1,4, caption 1,8, vqa 1,8, data 32).")
flags.DEFINE_integer("iters", 5, "Timed calls per measurement.")
flags.DEFINE_integer("warmup", 2, "Untimed calls after compiling (the anchor makes 2).")
flags.DEFINE_integer("image_size", 0, "Image size in pixels; 0: config.data.image_size.")
flags.DEFINE_integer("text_length", 0, "Text tokens for train / t2i / vqa; 0: config.data.text_length.")
flags.DEFINE_integer("t2i_steps", 28, "Euler steps of text to image.")
flags.DEFINE_float("cfg_scale", 7.0, "Classifier-free guidance scale of text to image.")
flags.DEFINE_string("sampler", "ancestral", "Comma list of text samplers for caption / vqa, each a method (ancestral | "
                    "confidence | semi_ar | threshold), +cache for the image K/V cache: ancestral,threshold+cache.")
flags.DEFINE_float("threshold", 0.9, "Probability the threshold sampler reveals at.")
flags.DEFINE_integer("num_blocks", 4, "Blocks of semi_ar and threshold.")
flags.DEFINE_integer("image_cache", 0, "R of the +cache samplers: a full pass every R calls (0: at block starts only).")
flags.DEFINE_float("confident_share", 0.0, "0: the random network as it is. > 0: each prediction makes this share of "
                   "positions (drawn from the ids) sure of one fixed random token (+30 logits), a stand-in for a "
                   "trained model's confidence; 1: every position sure (the threshold sampler's best case).")
flags.DEFINE_integer("caption_length", 128, "Caption tokens.")
flags.DEFINE_integer("caption_steps", 64, "Caption sampling steps.")
flags.DEFINE_integer("vqa_prompt_tokens", 32, "Fixed prompt tokens of a VQA row (the rest is generated).")
flags.DEFINE_integer("vqa_steps", 16, "VQA sampling steps.")
flags.DEFINE_enum("frozen_dtype", "compute", ["compute", "float32", "bfloat16"],
                  "dtype of the frozen weights (T5); 'compute': runtime.dtype (they are cast to it on use anyway).")
flags.DEFINE_integer("data_workers", 2, "Worker processes for --what=data.")
flags.DEFINE_integer("pause_pgid", 0, "A process group to SIGSTOP while timing and SIGCONT after (a job sharing "
                     "the accelerator in the same sitting); 0: none.")
flags.DEFINE_string("profile_dir", "", "Trace 2 more calls of every measurement into DIR/<measurement> "
                    "(jax.profiler, perfetto JSON; tools/trace_summary.py DIR lists the top ops).")

WHATS = ("train", "t2i", "caption", "vqa", "text_step", "data")
DEFAULT_BATCHES = {"train": (4,), "t2i": (1, 4), "caption": (1, 8), "vqa": (1, 8), "text_step": (1,), "data": (32,)}
H100_BF16_DENSE = 989.4e12  # FLOP/s, the anchor's MFU denominator


# --------------------------------------------------------------------------- setup
def bench_config(config, image_size: int = 0, text_length: int = 0):
    """A copy of `config` as benchmarked: vocab sizes resolved without a tokenizer, latents fed directly.

    Returns (config, latent_side, text_length). The VAE is left out of every measured path (as in
    the anchor): `latent_space` becomes "pixels" with the transformer's input channels, so the step
    sees (B, latent_side, latent_side, in_channels) latents.
    """
    c = copy.deepcopy(config)
    image_size = image_size or int(c.data.image_size)
    text_length = text_length or int(c.data.text_length)
    down = 8 if c.model.latent_space == "vae" else 1
    if image_size % down:
        raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling {down}")
    with c.unlocked():
        for key in ("transformer", "text_encoder"):
            if c.model[key].vocab_size == -1:  # demo: len(tokenizer) of the tokenizer it would train
                c.model[key].vocab_size = int(c.tokenizer.train_vocab_size)
        if image_size != int(c.data.image_size):
            c.model.transformer.sample_size = image_size // down
        c.data.image_size, c.data.text_length = image_size, text_length
        c.model.latent_space = "pixels"
    return c, image_size // down, text_length


def special_ids(c) -> tuple[int, int]:
    """(mask_id, eos_id) without a tokenizer: T5's <extra_id_0> = vocab - 1 and EOS = 1."""
    return int(c.model.transformer.vocab_size) - 1, 1


class Bench:
    """Plan, random weights and config facts shared by the measurements of one config."""

    def __init__(self, config, image_size: int = 0, text_length: int = 0, frozen_dtype: str = "compute"):
        self.config, self.latent_side, self.text_length = bench_config(config, image_size, text_length)
        c = self.config
        self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        self.rules = tuple(tuple(r) for r in c.sharding.rules)
        self.mask_id, self.eos_id = special_ids(c)
        arch = model_configs(c)
        self.mmdit_cfg = MMDiTConfig.from_dict(arch["transformer"])
        self.t5_cfg = T5Config.from_dict(arch["text_encoder"])
        self.channels = self.mmdit_cfg.in_channels
        rt = c.runtime
        self.frozen_dtype = rt.dtype if frozen_dtype == "compute" else frozen_dtype
        mmdit_attn = resolve_impl(rt.attention_impl, rt.dtype)
        self.facts = dict(
            image_size=int(c.data.image_size), latent_side=self.latent_side, text_length=self.text_length,
            dtype=rt.dtype, param_dtype=rt.param_dtype, frozen_dtype=self.frozen_dtype,
            # T5's attention has a bias (relative positions), which the cuDNN path does not take.
            attention_impl=dict(config=rt.attention_impl, mmdit=mmdit_attn,
                                t5="xla" if mmdit_attn == "cudnn" else mmdit_attn),
            scan_layers=bool(rt.scan_layers), remat_policy=rt.remat_policy, loss_fused=bool(c.loss.fused),
            ema=float(c.ema.decay) > 0, microbatches=int(c.train.microbatches), mesh=dict(self.mesh.shape),
            num_devices=jax.device_count(), device=jax.devices()[0].device_kind, jax=jax.__version__)
        self._plan = None

    @property
    def plan(self):
        if self._plan is None:
            self._plan = make_plan(self.config, self.mesh, self.rules, self.mask_id)
            self.facts["params"] = dict(self._plan.param_counts)
        return self._plan

    def check_batch(self, batch: int) -> None:
        axes = sharding.logical_to_mesh_spec(("batch",), self.rules)[0]
        size = math.prod(self.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
        if batch % size:
            raise ValueError(f"--batch={batch} is not divisible by the {size} devices the batch is sharded over "
                             f"(mesh {dict(self.mesh.shape)})")

    def batch_sharding(self, ndim: int):
        return sharding.batch_sharding(self.mesh, self.rules, ndim)

    def _init(self, pick, out_shardings):
        """One jitted init: the frozen T5 is cast inside it, so its float32 copy never exists in full."""
        plan, dtype = self.plan, self.frozen_dtype
        cast = lambda f: {k: cast_floats(v, dtype) if k == "text_encoder" else v for k, v in f.items()}
        return jax.jit(lambda: pick(*plan.init_fn(), cast), out_shardings=out_shardings)()

    def train_state(self):
        """(train state, frozen weights) at step 0."""
        return self._init(lambda s, f, cast: (s, cast(f)), (self.plan.state_shardings, self.plan.frozen_shardings))

    def inference_weights(self):
        """(params, frozen) without optimizer state or EMA (XLA drops them from the jitted init)."""
        return self._init(lambda s, f, cast: (s["params"], cast(f)),
                          (self.plan.state_shardings["params"], self.plan.frozen_shardings))

    def networks(self, params, frozen):
        split = self.plan.split
        return split.merge("transformer", params, frozen), split.merge("text_encoder", params, frozen)

    def random_ids(self, key, shape):
        # Ordinary tokens only: never the mask id, never pad / EOS / unk.
        return jax.random.randint(key, shape, 3, self.mask_id, dtype=jnp.int32)

    def random_latents(self, key, batch: int):
        shape = (batch, self.latent_side, self.latent_side, self.channels)
        return jax.random.normal(key, shape, jnp.float32)


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# --------------------------------------------------------------------------- timing
def memory_gib() -> float | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends do not implement it
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2 ** 30


def compile_ahead(jitted, *args):
    """(compiled, seconds for lower + compile)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def compiled_memory_gib(compiled) -> float | None:
    """XLA's own figure for one call: arguments + outputs + temporaries - donated (aliased) bytes."""
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return None
    return total / 2 ** 30


@dataclasses.dataclass(frozen=True)
class Timing:
    """How every measurement is timed: `warmup` untimed calls after compiling, then `iters` timed calls
    ending in block_until_ready.

    pause_pgid: a process group stopped (SIGSTOP) while warming up and timing, and continued after: a job
      sharing the accelerator in the same sitting (launch/gpu_sitting.py's demo training) never runs inside
      a timed window; it runs while this process compiles.
    trace_dir: after timing, `trace_calls` more calls are traced with jax.profiler into
      trace_dir/<measurement> (perfetto JSON; `python tools/trace_summary.py DIR` lists the top ops).
    """

    iters: int = 5
    warmup: int = 2
    pause_pgid: int = 0
    trace_dir: str = ""
    trace_calls: int = 2

    @contextlib.contextmanager
    def exclusive(self):
        if not self.pause_pgid:
            yield
            return
        os.killpg(self.pause_pgid, signal.SIGSTOP)
        try:
            time.sleep(1.0)  # what the stopped job had already queued on the device drains
            yield
        finally:
            os.killpg(self.pause_pgid, signal.SIGCONT)

    def measure(self, name: str, call):
        """(seconds per call, the last output); `call()` returns device arrays."""
        out = None
        with self.exclusive():
            for _ in range(self.warmup):
                out = call()
            jax.block_until_ready(out)
            start = time.perf_counter()
            for _ in range(self.iters):
                out = call()
            jax.block_until_ready(out)
            sec = (time.perf_counter() - start) / max(self.iters, 1)
            if self.trace_dir:
                with jax.profiler.trace(os.path.join(self.trace_dir, name), create_perfetto_trace=True):
                    for _ in range(self.trace_calls):
                        out = call()
                    jax.block_until_ready(out)
        return sec, out


def device_memory_limit_gib() -> float | None:
    """What the device's allocator may hand out (None where the backend does not say)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some backends do not implement it
        return None
    return stats["bytes_limit"] / 2 ** 30 if "bytes_limit" in stats else None


def row(bench: Bench, what: str, batch: int, sec: float, flops: int, compiled, compile_sec: float,
        **rates) -> dict:
    peak = H100_BF16_DENSE * bench.facts["num_devices"]
    out = dict(what=what, batch=batch, sec=sec, **rates, flops_per_step=int(flops),
               achieved_tflops=flops / sec / 1e12, mfu_vs_989=flops / sec / peak, peak_mem_gib=memory_gib(),
               xla_mem_gib=compiled_memory_gib(compiled), compile_sec=compile_sec)
    out.update(bench.facts)
    return out


# --------------------------------------------------------------------------- measurements
def bench_train(bench: Bench, batch: int, timing: Timing) -> dict:
    """The dual-loss train step on `batch` pairs per half (random latents and ids, all labels counted).

    A step whose compiled memory exceeds the device's allocator limit is not run: its row says
    `fits: false` with both figures (the largest batch that fits is found without crashing).
    """
    c, plan = bench.config, bench.plan
    loss_cfg = LossConfig.from_config(c.loss, mask_id=bench.mask_id, null_id=bench.eos_id)
    B, L = batch, bench.text_length
    k = jax.random.split(jax.random.key(1), 4)
    ones = jnp.ones((B, L), bool)
    batch_tree = {"t2i": {"image": bench.random_latents(k[0], B), "text_ids": bench.random_ids(k[1], (B, L))},
                  "i2t": {"image": bench.random_latents(k[2], B), "text_ids": bench.random_ids(k[3], (B, L)),
                          "label_mask": ones, "fixed_mask": ~ones}}
    shardings = jax.tree.map(lambda x: bench.batch_sharding(x.ndim), batch_tree)
    batch_tree = jax.device_put(batch_tree, shardings)
    step = make_train_step(plan, loss_cfg, shardings, microbatches=int(c.train.microbatches),
                           ema_decay=float(c.ema.decay))
    state, frozen = bench.train_state()
    compiled, compile_sec = compile_ahead(step, state, frozen, batch_tree)
    need, limit = compiled_memory_gib(compiled), device_memory_limit_gib()
    if need is not None and limit is not None and need > limit:
        return dict(what="train", batch=B, fits=False, xla_mem_gib=need, limit_gib=limit, compile_sec=compile_sec,
                    **bench.facts)
    holder = {"state": state}
    del state

    def call():
        holder["state"], metrics = compiled(holder["state"], frozen, batch_tree)  # state is donated
        return holder["state"], metrics

    sec, (_, metrics) = timing.measure(f"train_b{B}", call)
    if not bool(jax.device_get(metrics["finite"])):
        logging.warning("train step: non-finite loss with random weights (%s)", jax.device_get(metrics["loss"]))
    n = flops.train_step(bench.mmdit_cfg, bench.t5_cfg, B, bench.latent_side, L)
    out = row(bench, "train", B, sec, n, compiled, compile_sec, samples_per_sec=B / sec)
    out["fits"] = True
    out["naive_3x_flops"] = flops.naive_train_step(bench.mmdit_cfg, bench.t5_cfg, B, bench.latent_side, L)
    return out


def _images_fn(params, frozen, ids, null_ids, noise, *, bench: Bench, steps: int, cfg_scale: float):
    # Weights cast once per generation, outside the step loop (as torch.autocast's weight cache does).
    mmdit, t5 = bench.networks(cast_floats(params, bench.config.runtime.dtype), frozen)
    velocity = lambda x, hidden, t: mmdit(x, hidden, t)[0]
    return sample_images(velocity, noise, t5(ids), t5(null_ids), steps=steps, cfg_scale=cfg_scale)


def bench_t2i(bench: Bench, batch: int, timing: Timing, weights, steps: int, cfg_scale: float) -> dict:
    B, L = batch, bench.text_length
    k = jax.random.split(jax.random.key(2), 2)
    ids = jax.device_put(bench.random_ids(k[0], (B, L)), bench.batch_sharding(2))
    null_ids = jnp.full_like(ids, bench.eos_id)  # the empty prompt: EOS padding
    noise = jax.device_put(bench.random_latents(k[1], B), bench.batch_sharding(4))
    fn = jax.jit(functools.partial(_images_fn, bench=bench, steps=steps, cfg_scale=cfg_scale))
    compiled, compile_sec = compile_ahead(fn, *weights, ids, null_ids, noise)
    sec, _ = timing.measure(f"t2i_b{B}", lambda: compiled(*weights, ids, null_ids, noise))
    n = flops.text_to_image(bench.mmdit_cfg, bench.t5_cfg, B, bench.latent_side, L, steps, cfg_scale != 1.0)
    out = row(bench, "t2i", B, sec, n, compiled, compile_sec, images_per_sec=B / sec)
    out.update(steps=steps, cfg_scale=cfg_scale)
    return out


@dataclasses.dataclass(frozen=True)
class TextDecoder:
    """One entry of --sampler: a sample_text method, with the image K/V cache (refresh R) or without (None)."""

    method: str
    image_cache: int | None = None
    threshold: float = 0.9
    num_blocks: int = 4

    @property
    def name(self) -> str:
        return self.method + ("+cache" if self.image_cache is not None else "")


def parse_samplers(text: str, image_cache: int = 0, threshold: float = 0.9, num_blocks: int = 4) -> list[TextDecoder]:
    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        method, plus, rest = spec.partition("+")
        if method not in METHODS or (plus and rest != "cache"):
            raise ValueError(f"--sampler={text!r}: {spec!r} is not a method of {list(METHODS)} with an optional "
                             "'+cache'")
        out.append(TextDecoder(method, image_cache if plus else None, threshold, num_blocks))
    if not out:
        raise ValueError(f"--sampler={text!r}: expected a comma list of samplers")
    return out


def confident_logits(logits_BxLxV, ids_BxL, share: float, mask_id: int):
    """The stand-in for a trained model's confidence (--confident_share): a share of positions, drawn
    from the ids (so the same ids give the same logits), get +30 on one fixed random token each."""
    if share <= 0:
        return logits_BxLxV
    B, L, V = logits_BxLxV.shape
    target = jax.random.randint(jax.random.key(7), (B, L), 3, mask_id)
    digest = jnp.sum(ids_BxL.astype(jnp.uint32) * jnp.arange(1, L + 1, dtype=jnp.uint32))
    sure = jax.random.uniform(jax.random.fold_in(jax.random.key(8), digest), (B, L)) < share
    return logits_BxLxV + 30.0 * (sure[..., None] & (jnp.arange(V) == target[..., None]))


def _text_fn(params, frozen, latents, ids, fixed, rng, *, bench: Bench, decoder: TextDecoder, steps: int,
             confident_share: float):
    mmdit, t5 = bench.networks(cast_floats(params, bench.config.runtime.dtype), frozen)  # once, as in t2i
    zeros = jnp.zeros((latents.shape[0],), jnp.float32)  # clean image: timestep 0
    sure = lambda logits, x: confident_logits(logits, x, confident_share, bench.mask_id)  # noqa: E731
    if decoder.image_cache is None:
        logits_fn = lambda x: sure(mmdit(latents, t5(x), zeros)[1], x)
    else:
        def full(x):
            logits, image_kv = mmdit.logits_and_image_kv(latents, t5(x), zeros)
            return sure(logits, x), image_kv

        logits_fn = CachedLogits(full, lambda x, kv: sure(mmdit.text_logits(t5(x), zeros, kv), x),
                                 decoder.image_cache)
    loss = bench.config.loss
    return sample_text(logits_fn, ids, fixed, rng, method=decoder.method, steps=steps, mask_id=bench.mask_id,
                       schedule=Schedule(loss.text_schedule, loss.text_eps), eos_id=bench.eos_id,
                       threshold=decoder.threshold, num_blocks=decoder.num_blocks, return_stats=True)


def bench_text(bench: Bench, what: str, batch: int, timing: Timing, weights, *, length: int,
               prompt_tokens: int, steps: int, decoder: TextDecoder, confident_share: float = 0.0) -> dict:
    """Caption (prompt_tokens = 0) or VQA: `length` tokens, the first `prompt_tokens` fixed."""
    if not 0 <= prompt_tokens < length:
        raise ValueError(f"{what}: prompt tokens {prompt_tokens} must be in [0, text length {length})")
    B = batch
    k = jax.random.split(jax.random.key(3), 2)
    latents = jax.device_put(bench.random_latents(k[0], B), bench.batch_sharding(4))
    fixed = jnp.broadcast_to(jnp.arange(length) < prompt_tokens, (B, length))
    ids = jnp.where(fixed, bench.random_ids(k[1], (B, length)), bench.mask_id)
    ids, fixed = jax.device_put((ids, fixed), bench.batch_sharding(2))
    rng = jax.random.key(4)
    fn = jax.jit(functools.partial(_text_fn, bench=bench, decoder=decoder, steps=steps,
                                   confident_share=confident_share))
    compiled, compile_sec = compile_ahead(fn, *weights, latents, ids, fixed, rng)
    sec, (_, stats) = timing.measure(f"{what}_{decoder.name}_b{B}",
                                     lambda: compiled(*weights, latents, ids, fixed, rng))
    stats = jax.device_get(stats)  # the same every call: same inputs and key
    nfe, full = int(stats["nfe"]), int(stats["full_passes"])
    n = flops.image_to_text(bench.mmdit_cfg, bench.t5_cfg, B, bench.latent_side, length, nfe, nfe - full)
    generated = length - prompt_tokens
    out = row(bench, what, B, sec, n, compiled, compile_sec, tokens_per_sec=B * generated / sec)
    out.update(sampler=decoder.name, method=decoder.method, image_cache=decoder.image_cache, steps=steps,
               text_length=length, generated_tokens=generated, predictions=nfe, full_passes=full,
               nfe_per_row=float(stats["nfe_per_row"].mean()), confident_share=confident_share,
               **({"threshold": decoder.threshold} if decoder.method == "threshold" else {}),
               **({"num_blocks": decoder.num_blocks} if decoder.method in ("semi_ar", "threshold") else {}))
    return out


def _prediction_fns(bench: Bench) -> dict:
    """Jittable predictions (params, frozen, ...) of the text samplers at timestep 0: "full" (T5 + MM-DiT ->
    logits and image K/V) and "cached" (T5 + text-only MM-DiT over the image K/V); the MM-DiT parts alone on
    given T5 states ("mmdit_full", "mmdit_cached"), and "t5"."""
    def nets(params, frozen):
        return bench.networks(cast_floats(params, bench.config.runtime.dtype), frozen)

    def t0(x):
        return jnp.zeros((x.shape[0],), jnp.float32)

    def mmdit_full(params, frozen, latents, hidden):
        return nets(params, frozen)[0].logits_and_image_kv(latents, hidden, t0(hidden))

    def mmdit_cached(params, frozen, hidden, image_kv):
        return nets(params, frozen)[0].text_logits(hidden, t0(hidden), image_kv)

    def t5(params, frozen, ids):
        return nets(params, frozen)[1](ids)

    return dict(t5=t5, mmdit_full=mmdit_full, mmdit_cached=mmdit_cached,
                full=lambda p, f, latents, ids: mmdit_full(p, f, latents, t5(p, f, ids)),
                cached=lambda p, f, ids, image_kv: mmdit_cached(p, f, t5(p, f, ids), image_kv))


def bench_text_step(bench: Bench, batch: int, timing: Timing, weights, length: int) -> dict:
    """One text prediction of `length` tokens, full (and making the image K/V) vs text-only over the cache;
    the same for the MM-DiT alone (the part the cache changes; T5 runs on every prediction either way)."""
    B = batch
    k = jax.random.split(jax.random.key(5), 2)
    latents = jax.device_put(bench.random_latents(k[0], B), bench.batch_sharding(4))
    ids = jax.device_put(bench.random_ids(k[1], (B, length)), bench.batch_sharding(2))
    fns = {name: jax.jit(fn) for name, fn in _prediction_fns(bench).items()}
    hidden = fns["t5"](*weights, ids)
    secs, compiled = {}, {}
    for name, args in (("full", (latents, ids)), ("mmdit_full", (latents, hidden))):
        compiled[name], _ = compile_ahead(fns[name], *weights, *args)
        secs[name], (_, image_kv) = timing.measure(f"text_step_{name}_b{B}", lambda: compiled[name](*weights, *args))
        cached = name.replace("full", "cached")
        cargs = (ids if name == "full" else hidden, image_kv)
        compiled[cached], compile_sec = compile_ahead(fns[cached], *weights, *cargs)
        secs[cached], _ = timing.measure(f"text_step_{cached}_b{B}", lambda: compiled[cached](*weights, *cargs))
    m, t5, n = bench.mmdit_cfg, bench.t5_cfg, flops.num_image_tokens(bench.mmdit_cfg, bench.latent_side)
    full_flops = flops.text_prediction(m, t5, B, bench.latent_side, length)
    cached_flops = flops.text_prediction(m, t5, B, bench.latent_side, length, image_cached=True)
    mmdit_full, mmdit_cached = flops.mmdit_forward(m, B, n, length), flops.mmdit_text_only_forward(m, B, n, length)
    out = row(bench, "text_step", B, secs["cached"], cached_flops, compiled["cached"], compile_sec)
    out.update(text_length=length, image_tokens=n, full_sec=secs["full"], full_flops=int(full_flops),
               time_ratio=secs["full"] / secs["cached"], flops_ratio=full_flops / cached_flops,
               mmdit_full_sec=secs["mmdit_full"], mmdit_cached_sec=secs["mmdit_cached"],
               mmdit_time_ratio=secs["mmdit_full"] / secs["mmdit_cached"], mmdit_flops_ratio=mmdit_full / mmdit_cached,
               t5_flops=int(flops.t5_forward(t5, B, length)))
    return out


# --------------------------------------------------------------------------- entry point
def parse_whats(text: str) -> list[str]:
    whats = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in whats if w not in WHATS]
    if bad or not whats:
        raise ValueError(f"--what={text!r}: unknown {bad}; expected a comma list of {list(WHATS)}")
    return whats


def parse_batches(text: str, what: str) -> tuple[int, ...]:
    if not text:
        return DEFAULT_BATCHES[what]
    try:
        sizes = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--batch={text!r}: expected a comma list of positive integers") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch={text!r}: expected a comma list of positive integers")
    return sizes


@dataclasses.dataclass(frozen=True)
class Options:
    """The command's flags other than --config / --what / --batch (same names, same defaults)."""

    iters: int = 5
    warmup: int = 2
    image_size: int = 0
    text_length: int = 0
    t2i_steps: int = 28
    cfg_scale: float = 7.0
    sampler: str = "ancestral"
    threshold: float = 0.9
    num_blocks: int = 4
    image_cache: int = 0
    confident_share: float = 0.0
    caption_length: int = 128
    caption_steps: int = 64
    vqa_prompt_tokens: int = 32
    vqa_steps: int = 16
    frozen_dtype: str = "compute"
    data_workers: int = 2
    pause_pgid: int = 0
    profile_dir: str = ""


def run(config, whats, batch_text: str = "", opts: Options = Options(), emit=None) -> list[dict]:
    """Runs the measurements in order; returns (and passes each to `emit`) one dict per measurement."""
    bench = Bench(config, opts.image_size, opts.text_length, opts.frozen_dtype)
    timing = Timing(opts.iters, opts.warmup, opts.pause_pgid, opts.profile_dir)
    decoders = parse_samplers(opts.sampler, opts.image_cache, opts.threshold, opts.num_blocks)
    weights, rows = None, []

    def measure(what, b):
        if what == "data":
            return [bench_data(bench, b, opts.data_workers)]
        if what == "train":
            return [bench_train(bench, b, timing)]
        if what == "t2i":
            return [bench_t2i(bench, b, timing, weights, opts.t2i_steps, opts.cfg_scale)]
        if what == "text_step":
            return [bench_text_step(bench, b, timing, weights, opts.caption_length)]
        caption = what == "caption"
        task = dict(length=opts.caption_length if caption else bench.text_length,
                    prompt_tokens=0 if caption else opts.vqa_prompt_tokens,
                    steps=opts.caption_steps if caption else opts.vqa_steps)
        out = [bench_text(bench, what, b, timing, weights, decoder=d, confident_share=opts.confident_share, **task)
               for d in decoders]
        for r in out[1:]:  # against the first sampler, measured in this run
            r.update(baseline=out[0]["sampler"], speedup=out[0]["sec"] / r["sec"])
        return out

    for what in whats:
        for b in parse_batches(batch_text, what):
            if what != "data":
                bench.check_batch(b)
            if what in ("t2i", "caption", "vqa", "text_step"):
                weights = weights or bench.inference_weights()
            for out in measure(what, b):
                rows.append(out)
                if emit is not None:
                    emit(out)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required")
    try:
        parse_samplers(FLAGS.sampler)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    whats = parse_whats(FLAGS.what)
    for what in whats:
        parse_batches(FLAGS.batch, what)  # fail on a bad --batch before anything compiles
    opts = Options(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Options)})
    run(FLAGS.config, whats, FLAGS.batch, opts, emit=lambda r: print(json.dumps(r), flush=True))


if __name__ == "__main__":
    app.run(main)
