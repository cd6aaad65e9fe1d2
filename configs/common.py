"""Shared pieces of the training configs (stage1/2/3, demo).

`base_config()` holds every key a run reads, with the release's recipe as
defaults (REFERENCE.md, Objectives); a stage file changes values, never adds
keys, and returns the config locked, so a typo in a stage file or on the
command line (`--config.train.batch_size=...`) fails, naming the key.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dual_diffusion.models.configs import MMDiTConfig, Runtime, T5Config, VAEConfig
from dual_diffusion.sharding import DEFAULT_RULES

# A vocab_size of -1 means "len(tokenizer)", resolved once the tokenizer is loaded (the demo trains its own).
VOCAB_FROM_TOKENIZER = -1


def _dataclass_dict(obj) -> ml_collections.ConfigDict:
    d = obj.to_dict()
    # ConfigDict cannot type-check None or list values across overrides: store tuples, placeholders.
    out = ml_collections.ConfigDict()
    for k, v in d.items():
        out[k] = tuple(v) if isinstance(v, list) else (config_dict.placeholder(str) if v is None else v)
    return out


def data_config() -> ml_collections.ConfigDict:
    """The data pipeline's own defaults (dual_diffusion/data/pipeline.py)."""
    from dual_diffusion.data.pipeline import default_data_config
    return default_data_config()


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = config_dict.placeholder(str)  # converted checkpoint folder, or None to train from scratch

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.model_file = config_dict.placeholder(str)  # SentencePiece model (tokenizer_3/spiece.model)
    c.tokenizer.train_corpus = ""  # "shapes": train a small one into WORKDIR/tokenizer on first run (demo)
    c.tokenizer.train_vocab_size = 512
    c.tokenizer.train_model_type = "unigram"  # SentencePiece model of the trained tokenizer: "unigram" | "bpe"

    c.model = ml_collections.ConfigDict()
    c.model.transformer = _dataclass_dict(MMDiTConfig())
    c.model.text_encoder = _dataclass_dict(T5Config())
    c.model.vae = _dataclass_dict(VAEConfig())
    c.model.latent_space = "vae"  # "vae" (latents = (mean - shift) * scale) or "pixels" ([-1, 1] images)
    # "mask_row" | "none" | "all". The release trains T5's mask row in stage 2 only (stages 1 and 3 set
    # "none": T5 then runs forward only, no backward pass).
    c.model.text_encoder_trainable = "mask_row"

    c.runtime = _dataclass_dict(Runtime(dtype="bfloat16", scan_layers=True, remat_policy="dots_no_batch"))
    c.runtime.attention_impl = "auto"

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = tuple((name, axes) for name, axes in DEFAULT_RULES)

    c.data = data_config()

    c.loss = ml_collections.ConfigDict()
    c.loss.lambda_text = 0.2
    c.loss.image_form = "x_pred"
    c.loss.timestep_kind = "logit_normal"
    c.loss.timestep_mean = 0.0
    c.loss.timestep_std = 1.0
    c.loss.caption_dropout = 0.1
    c.loss.text_schedule = "loglinear"
    c.loss.text_eps = 1e-3
    c.loss.fused = True  # both halves as one batch of 2B through T5 and the MM-DiT
    # Text loss: "per_example" (each row / its label count) or "batch_tokens" (sum / (B x L), the release's);
    # equal while labels cover every position (stages 1-2 captions); stage 3 sets the release's.
    c.loss.text_normalization = "per_example"
    c.loss.latent_sampling = "sample"  # the release trains on VAE posterior draws; "mean": the posterior mean

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 3e-5
    c.optimizer.warmup_steps = 2000
    c.optimizer.schedule = "constant"  # after warmup: "constant" | "cosine" | "linear"
    c.optimizer.decay_steps = 0  # for cosine/linear: total steps; 0 means train.num_steps
    c.optimizer.end_lr_factor = 0.0
    c.optimizer.weight_decay = 1e-2
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 2.0

    # The release's code calls its EMA update with the default decay 0.9999; the 0.9995 of its config
    # is never read. We follow the code.
    c.ema = ml_collections.ConfigDict(dict(decay=0.9999))

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256  # global, per half (t2i pairs and i2t pairs each)
    c.train.microbatches = 1
    c.train.num_steps = 60_000
    c.train.log_every = 50
    c.train.max_consecutive_nonfinite = 5  # skipped updates in a row (non-finite or spikes) that stop the run
    # > 0: skip an update whose loss exceeds this x the median of the last loss_spike_window applied losses
    # (0: off; when on, the window is part of the train state).
    c.train.loss_spike_factor = 0.0
    c.train.loss_spike_window = 50

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.samples = ml_collections.ConfigDict()
    c.samples.every_steps = 5000  # 0: never
    c.samples.prompts = ("a red circle", "a photo of a dog on a beach", "a blue cube on a wooden table",
                         "a bowl of fruit")
    c.samples.image_steps = 28
    c.samples.cfg_scale = 7.0
    c.samples.text_steps = 64
    c.samples.text_method = "ancestral"  # sample_text method: "ancestral" (release) | "confidence" | "semi_ar" | "threshold"
    c.samples.min_new_tokens = 0  # EOS banned on the first N generated positions (against empty captions/answers)
    c.samples.num_caption_images = 4

    c.eval = ml_collections.ConfigDict()
    c.eval.shapes_suite = False  # print the built-in shapes-suite scores at the end of training
    c.eval.shapes_suite_size = 64
    return c


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks the config: overrides may change values but not add keys."""
    c.lock()
    return c


def set_data(c: ml_collections.ConfigDict, *, image_size: int, text_length: int, vqa: bool = False) -> None:
    """Batch geometry of a stage (the pipeline's image_size / text_length) and the model's sample size."""
    c.data.image_size = image_size
    c.data.text_length = text_length
    # SD3's VAE downsamples 8x; the transformer's base position grid follows the training resolution.
    down = 8 if c.model.latent_space == "vae" else 1
    c.model.transformer.sample_size = image_size // down
    del vqa  # the VQA layout (answer-only text loss) is chosen by the data sources, see data/pipeline.py


FILL_ME = "FILL_ME"  # a path the user must set; config_check refuses to train while one is left


def set_sources(c: ml_collections.ConfigDict, t2i: list[tuple[str, str, float]], i2t: list[tuple[str, str, float]]
                ) -> None:
    """Data mixes as (kind, path, weight); paths under FILL_ME/ are placeholders for the user's copies."""
    c.data.t2i_sources = [dict(kind=k, path=p, weight=w) for k, p, w in t2i]
    c.data.i2t_sources = [dict(kind=k, path=p, weight=w) for k, p, w in i2t]


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> None:
    """`configs/x.py:VARIANT`: none defined beyond each file's own; unknown variants fail loudly."""
    if arg:
        raise ValueError(f"unknown config variant {arg!r}")
