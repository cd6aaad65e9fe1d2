"""Validates a training config before anything is built or compiled.

Unknown keys are already refused by the locked ConfigDict (configs/common.py);
this checks values and how they fit together, and raises one ConfigError that
lists every problem, each naming its key (`config.train.batch_size=...: ...`).
Data sources and files are checked here too, all at once, so that a run fails
before it writes anything into its workdir. `explain_flag_error` turns an
ml_collections/absl parse failure of the command line into one line naming the
`--config.<path>` at fault.
"""
from __future__ import annotations

import glob
import math
import os
import re
from pathlib import Path

from dual_diffusion.cli import UsageError
from dual_diffusion.models.configs import MMDiTConfig, Runtime, T5Config, VAEConfig


class ConfigError(UsageError, ValueError):
    """Every invalid value of a config; str() lists them one per line, `one_line()` joins them."""

    def one_line(self) -> str:
        return "; ".join(line.strip() for line in str(self).splitlines()[1:]) or str(self)


CHOICES = {
    "model.latent_space": ("vae", "pixels"),
    "model.text_encoder_trainable": ("mask_row", "none", "all"),
    "model.frozen_dtype": ("", "float32", "bfloat16"),
    "sharding.frozen_rules": ("fsdp", "replicated"),  # sharding.FROZEN_PLACEMENTS
    "runtime.dtype": ("float32", "bfloat16"),
    "runtime.param_dtype": ("float32", "bfloat16"),
    "runtime.attention_impl": ("auto", "xla", "cudnn", "pallas"),
    "runtime.remat_policy": ("none", "full", "dots", "dots_no_batch", "dots_offload"),
    "loss.image_form": ("x_pred", "velocity"),
    "loss.timestep_kind": ("logit_normal", "uniform", "mode"),
    "loss.text_schedule": ("loglinear", "linear", "cosine"),
    "loss.text_normalization": ("per_example", "batch_tokens"),  # diffusion/masked.py NORMALIZATIONS
    "loss.latent_sampling": ("sample", "mean"),  # training/loss.py LATENT_SAMPLING
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
    "train.loss_spike_factor": (0.0, math.inf, True, False),
    "train.loss_spike_window": (1, math.inf, True, False),
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


def check_config(config, num_devices: int | None = None, *, dry_run: bool = False, num_slices: int = 1) -> None:
    """Raises ConfigError listing every invalid value (names the key and what was expected).

    num_devices / num_slices: the devices the mesh is built over (None: not checked).
    dry_run: files (init_from, tokenizer) are not needed and not checked.
    """
    errors: list[str] = []
    for key, choices in CHOICES.items():
        try:
            value = _get(config, key)
        except (KeyError, AttributeError):  # a config built without this optional key (tests' tiny ones)
            continue
        if value not in choices:
            errors.append(f"config.{key}={value!r}: expected one of {list(choices)}")
    for key, (low, high, low_inc, high_inc) in RANGES.items():
        try:
            value = _get(config, key)
        except (KeyError, AttributeError):  # a config built without this optional key (tests' tiny ones)
            continue
        if not isinstance(value, (int, float)) or not _in_range(value, low, high, low_inc, high_inc):
            lo, hi = ("[" if low_inc else "(") + str(low), str(high) + ("]" if high_inc else ")")
            kind = "an integer" if isinstance(low, int) else "a number"
            errors.append(f"config.{key}={value!r}: expected {kind} in {lo}, {hi}")
    errors += _check_models(config)
    errors += _world_errors(config)
    errors += _check_mesh_and_batch(config, num_devices, num_slices)
    if not dry_run:
        errors += _check_files(config)
    if config.tokenizer.train_corpus not in ("", "shapes"):
        errors.append(f"config.tokenizer.train_corpus={config.tokenizer.train_corpus!r}: expected '' or 'shapes'")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _world_errors(config) -> list[str]:
    from dual_diffusion.data.shapes import world_of_run

    try:
        world_of_run(config)
    except (ValueError, TypeError) as e:
        return [f"config.data.shapes_world: {e}"]
    return []


def _source_errors(config) -> list[str]:
    """Every data source whose kind is unknown or whose files are missing, each with its config key."""
    from dual_diffusion.data.sources import SOURCES

    errors = []
    for stream in ("t2i_sources", "i2t_sources"):
        for k, spec in enumerate(config.data.get(stream) or ()):
            key, kind, path = f"config.data.{stream}[{k}]", spec.get("kind"), str(spec.get("path", "") or "")
            if kind not in SOURCES:
                errors.append(f"{key}.kind={kind!r}: expected one of {sorted(SOURCES)}")
            elif kind == "shapes":
                continue
            elif not path:
                errors.append(f"{key}.path is not set ({kind} sources read files)")
            elif "FILL_ME" in path:
                errors.append(f"{key}.path={path!r}: fill in the path of your copy of this {kind} source "
                              f"(--config.{stream_key(stream, k)}.path=/your/copy/...)")
            elif "://" in path:
                continue  # remote: found (or not) by the reader, no cheap local check
            elif kind == "wds":
                pattern = os.path.join(path, "*.tar") if os.path.isdir(path) else path
                if not glob.glob(pattern):
                    errors.append(f"{key}.path={path!r}: no tar shards match {pattern!r}")
            elif kind == "tfds":
                if not os.path.isdir(path):
                    errors.append(f"{key}.path={path!r}: no such folder (a TFDS data_dir)")
            elif not os.path.isfile(path):
                errors.append(f"{key}.path={path!r}: no such file")
    return errors


def stream_key(stream: str, index: int) -> str:
    """The command-line path of one data source: `data.t2i_sources[0]` (ml_collections indexes lists)."""
    return f"data.{stream}[{index}]"


def _check_files(config) -> list[str]:
    errors = _source_errors(config)
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


# --------------------------------------------------------------------------- command-line parse errors
_OVERRIDE = re.compile(r"^--?config\.([^=\s]+)(?:=(.*))?$")
_INDEXED = re.compile(r"^([^\[\]]+)((?:\[\d+\])*)$")


def _walk(config, path: str) -> str | None:
    """None when `path` (`train.batch_size`, `data.t2i_sources[0].path`) exists in config, else why not."""
    node, walked = config, "config"
    for part in path.split("."):
        m = _INDEXED.match(part)
        if not m:
            return f"config.{path}: {part!r} is not a key or key[index]"
        name, indexes = m.group(1), [int(i) for i in re.findall(r"\d+", m.group(2))]
        keys = list(node.keys()) if hasattr(node, "keys") else None
        if keys is None:
            return f"config.{path}: {walked} is a value ({type(node).__name__}), not a group of keys"
        if name not in keys:
            return f"unknown config key config.{path}: {walked} has no {name!r} (its keys: {', '.join(sorted(keys))})"
        node, walked = node[name], f"{walked}.{name}"
        for i in indexes:
            if not isinstance(node, (list, tuple)) or i >= len(node):
                n = len(node) if isinstance(node, (list, tuple)) else 0
                return f"config.{path}: {walked} has {n} entries, index {i} is out of range"
            node, walked = node[i], f"{walked}[{i}]"
    return None


def _load_base_config(config_arg: str):
    """The config that `--config=FILE[:arg]` names, without overrides (None if it cannot be loaded)."""
    from absl import flags
    from ml_collections import config_flags

    import sys

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    saved, sys.argv = sys.argv, ["prog", f"--config={config_arg}"]  # overrides are read from sys.argv
    try:
        values(sys.argv)
        return values.config
    except Exception:  # noqa: BLE001  (the caller reports the original error)
        return None
    finally:
        sys.argv = saved


def config_file_error(argv: list[str]) -> str | None:
    """The problem with `--config=FILE[:arg]` in argv when FILE does not exist (ml_collections only
    reports it when the config is first read, with a traceback), else None."""
    config_args = [a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))]
    config_args += [argv[k + 1] for k, a in enumerate(argv[:-1]) if a in ("--config", "-config")]
    if config_args:
        file = config_args[-1].split(":", 1)[0]
        if not os.path.isfile(file):
            return f"--config={config_args[-1]}: no such file {file!r} (expected configs/<name>.py[:variant])"
    return None


def explain_flag_error(argv: list[str], error: BaseException) -> str:
    """One line for a failed parse of the train command line (no traceback)."""
    config_args = [a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))]
    if config_file_error(argv):
        return config_file_error(argv)
    if config_args:
        base = _load_base_config(config_args[-1])
        if base is not None:
            for arg in argv:
                m = _OVERRIDE.match(arg)
                if m:
                    problem = _walk(base, m.group(1))
                    if problem:
                        return f"{arg}: {problem}"
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:  # an exception inside the config file's get_config
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return f"--config={config_args[-1] if config_args else ''}: {last}"
    first = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, (KeyError, IndexError, AttributeError)):
        return f"bad command line ({type(error).__name__}: {first})"
    return first


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


def _check_mesh_and_batch(config, num_devices, num_slices: int = 1) -> list[str]:
    from dual_diffusion.sharding import mesh_shape

    errors = []
    sizes = {k: config.mesh[k] for k in ("data", "fsdp", "tensor")}
    dcn_data = config.mesh.get("dcn_data", -1)
    for k, v in dict(sizes, dcn_data=dcn_data).items():
        if not isinstance(v, int) or v == 0 or v < -1:
            errors.append(f"config.mesh.{k}={v!r}: expected a positive size or -1 (the remaining devices)")
    if list(sizes.values()).count(-1) > 1:
        errors.append(f"config.mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if errors or num_devices is None:
        return errors
    try:
        (data, fsdp, tensor), (slices, _, _) = mesh_shape(*sizes.values(), num_devices, num_slices, dcn_data)
    except ValueError as e:
        errors.append(f"config.mesh={dict(sizes, dcn_data=dcn_data)} does not fit {num_devices} devices"
                      + (f" in {num_slices} slices" if num_slices > 1 else "") + f": {e}")
        return errors
    resolved = {"data": slices * data, "fsdp": fsdp, "tensor": tensor}
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
