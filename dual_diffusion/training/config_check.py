"""Validates a training config before anything is built or compiled.

Unknown keys are already refused by the locked ConfigDict (configs/common.py);
this checks values and how they fit together, and raises one ConfigError that
lists every problem, each naming its key (`config.train.batch_size=...: ...`).
"""
from __future__ import annotations

import math
from pathlib import Path

from dual_diffusion.models.configs import MMDiTConfig, Runtime, T5Config, VAEConfig


class ConfigError(ValueError):
    pass


CHOICES = {
    "model.latent_space": ("vae", "pixels"),
    "model.text_encoder_trainable": ("mask_row", "none", "all"),
    "runtime.dtype": ("float32", "bfloat16"),
    "runtime.param_dtype": ("float32", "bfloat16"),
    "runtime.attention_impl": ("auto", "xla", "cudnn", "pallas"),
    "runtime.remat_policy": ("none", "full", "dots", "dots_no_batch"),
    "loss.image_form": ("x_pred", "velocity"),
    "loss.timestep_kind": ("logit_normal", "uniform", "mode"),
    "loss.text_schedule": ("loglinear", "linear", "cosine"),
    "optimizer.schedule": ("constant", "cosine", "linear"),
    "samples.text_method": ("ancestral", "confidence", "semi_ar"),
}

# key: (low, high, low_inclusive, high_inclusive)
RANGES = {
    "optimizer.lr": (0.0, math.inf, False, False),
    "optimizer.weight_decay": (0.0, math.inf, True, False),
    "optimizer.clip_norm": (0.0, math.inf, True, False),
    "optimizer.warmup_steps": (0, math.inf, True, False),
    "optimizer.b1": (0.0, 1.0, True, False),
    "optimizer.b2": (0.0, 1.0, True, False),
    "ema.decay": (0.0, 1.0, True, False),
    "loss.lambda_text": (0.0, math.inf, True, False),
    "loss.caption_dropout": (0.0, 1.0, True, True),
    "loss.text_eps": (0.0, 1.0, False, False),
    "train.batch_size": (1, math.inf, True, False),
    "train.microbatches": (1, math.inf, True, False),
    "train.num_steps": (1, math.inf, True, False),
    "train.log_every": (1, math.inf, True, False),
    "train.max_consecutive_nonfinite": (1, math.inf, True, False),
    "checkpoint.every_steps": (1, math.inf, True, False),
    "checkpoint.keep": (1, math.inf, True, False),
    "samples.every_steps": (0, math.inf, True, False),
}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _in_range(value, low, high, low_inc, high_inc) -> bool:
    return (value >= low if low_inc else value > low) and (value <= high if high_inc else value < high)


def check_config(config, num_devices: int | None = None, *, dry_run: bool = False) -> None:
    """Raises ConfigError listing every invalid value (names the key and what was expected).

    dry_run: files (init_from, tokenizer) are not needed and not checked.
    """
    errors: list[str] = []
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            errors.append(f"config.{key}={value!r}: expected one of {list(choices)}")
    for key, (low, high, low_inc, high_inc) in RANGES.items():
        value = _get(config, key)
        if not isinstance(value, (int, float)) or not _in_range(value, low, high, low_inc, high_inc):
            lo, hi = ("[" if low_inc else "(") + str(low), str(high) + ("]" if high_inc else ")")
            errors.append(f"config.{key}={value!r}: expected a number in {lo}, {hi}")
    errors += _check_models(config)
    errors += _check_mesh_and_batch(config, num_devices)
    if not dry_run:
        errors += _check_files(config)
    if config.tokenizer.train_corpus not in ("", "shapes"):
        errors.append(f"config.tokenizer.train_corpus={config.tokenizer.train_corpus!r}: expected '' or 'shapes'")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _check_files(config) -> list[str]:
    errors = []
    for stream in ("t2i_sources", "i2t_sources"):
        for k, spec in enumerate(config.data.get(stream) or ()):
            if "FILL_ME" in str(spec.get("path", "")):
                errors.append(f"config.data.{stream}[{k}].path={spec['path']!r}: fill in the path of your copy "
                              f"of this {spec.get('kind')} source (--config.data.{stream}=...)")
    if config.init_from and not Path(config.init_from).is_dir():
        errors.append(f"config.init_from={config.init_from!r}: no such folder (a converted checkpoint, "
                      "see tools/convert_sd3_weights.py)")
    if not config.tokenizer.train_corpus and not config.init_from:
        mf = config.tokenizer.model_file
        if not mf:
            errors.append("config.tokenizer.model_file is not set (and neither init_from nor "
                          "tokenizer.train_corpus provide a tokenizer)")
        elif not Path(mf).is_file():
            errors.append(f"config.tokenizer.model_file={mf!r}: no such file")
    return errors


def _check_models(config) -> list[str]:
    errors = []
    built = {}
    for key, cls in (("transformer", MMDiTConfig), ("text_encoder", T5Config), ("vae", VAEConfig)):
        try:
            built[key] = cls.from_dict(config.model[key].to_dict())
        except ValueError as e:
            errors.append(f"config.model.{key}: {e}")
    try:
        Runtime.from_dict(config.runtime.to_dict())
    except ValueError as e:
        errors.append(f"config.runtime: {e}")
    if len(built) < 3:
        return errors
    mm, t5, vae = built["transformer"], built["text_encoder"], built["vae"]
    for key, value in (("transformer.num_layers", mm.num_layers), ("transformer.num_attention_heads",
                       mm.num_attention_heads), ("text_encoder.num_layers", t5.num_layers)):
        if value < 1:
            errors.append(f"config.model.{key}={value}: expected >= 1")
    if mm.joint_attention_dim != t5.d_model:
        errors.append(f"config.model.transformer.joint_attention_dim={mm.joint_attention_dim} must equal "
                      f"config.model.text_encoder.d_model={t5.d_model}")
    want_ch = 3 if config.model.latent_space == "pixels" else vae.latent_channels
    if mm.in_channels != want_ch:
        errors.append(f"config.model.transformer.in_channels={mm.in_channels}: latent_space="
                      f"{config.model.latent_space!r} gives {want_ch} channels")
    if mm.text_pos_embed_len and mm.text_pos_embed_len < config.data.text_length:
        errors.append(f"config.model.transformer.text_pos_embed_len={mm.text_pos_embed_len} is shorter than "
                      f"config.data.text_length={config.data.text_length}")
    if -1 not in (mm.vocab_size, t5.vocab_size) and mm.vocab_size > t5.vocab_size:
        errors.append(f"config.model.transformer.vocab_size={mm.vocab_size} exceeds the text encoder's "
                      f"vocab_size={t5.vocab_size}")
    return errors


def _check_mesh_and_batch(config, num_devices) -> list[str]:
    errors = []
    sizes = {k: config.mesh[k] for k in ("data", "fsdp", "tensor")}
    for k, v in sizes.items():
        if not isinstance(v, int) or v == 0 or v < -1:
            errors.append(f"config.mesh.{k}={v!r}: expected a positive size or -1 (the remaining devices)")
    if list(sizes.values()).count(-1) > 1:
        errors.append(f"config.mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if errors or num_devices is None:
        return errors
    known = math.prod(v for v in sizes.values() if v != -1)
    if num_devices % known or (-1 not in sizes.values() and known != num_devices):
        errors.append(f"config.mesh={sizes} does not fit {num_devices} devices")
        return errors
    resolved = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    rules = dict(tuple(r) for r in config.sharding.rules)
    batch_axes = rules.get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    shards = math.prod(resolved[a] for a in batch_axes if a in resolved)
    per_micro = config.train.batch_size // max(config.train.microbatches, 1)
    if config.train.batch_size % max(config.train.microbatches, 1):
        errors.append(f"config.train.microbatches={config.train.microbatches} does not divide "
                      f"config.train.batch_size={config.train.batch_size}")
    elif per_micro % shards:
        errors.append(f"config.train.batch_size={config.train.batch_size} (/{config.train.microbatches} "
                      f"microbatches) is not divisible by the {shards} batch shards of mesh {resolved}")
    return errors
