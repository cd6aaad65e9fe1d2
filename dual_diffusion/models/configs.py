"""Architecture configs of the three networks, and the runtime options they share.

Architecture configs describe parameters (they are saved next to every
checkpoint as JSON); `Runtime` describes how a network computes (dtype,
attention kernel, layer scan, remat) and never changes the parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def _from_dict(cls, data: Mapping[str, Any], what: str):
    """Builds a dataclass from a dict, naming unknown or missing keys in the error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{what}: unknown config key(s) {unknown}; expected a subset of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        if isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{what}: {e}") from None


class _Config:
    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        return _from_dict(cls, data, cls.__name__)


@dataclasses.dataclass(frozen=True)
class Runtime(_Config):
    """How a network computes; shared by all three networks.

    dtype: compute dtype ("float32" or "bfloat16"); parameters stay in param_dtype
      and are cast on use, so bf16 training keeps fp32 master weights.
    attention_impl: "auto" | "xla" | "cudnn" | "pallas" (see models/attention.py).
    attention_block: preferred query/key block of Pallas splash attention (a multiple of 128; the
      largest such block dividing the padded sequence is used).
    scan_layers: run identical consecutive layers with one `jax.lax.scan` (fast
      compiles at 24+ layers). Parameters are stored per layer either way.
    remat_policy: "none" | "full" | "dots" | "dots_no_batch" | "dots_offload" (models/layers.py).
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    attention_block: int = 512
    scan_layers: bool = False
    remat_policy: str = "none"


@dataclasses.dataclass(frozen=True)
class MMDiTConfig(_Config):
    """D-DiT MM-DiT (REFERENCE.md, Network). Defaults: SD3-medium with the T5 vocabulary."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    joint_attention_dim: int = 4096
    pos_embed_max_size: int = 192
    vocab_size: int = 32100
    qk_norm: str | None = None  # None or "rms_norm" (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5: blocks with an extra image self-attention
    num_null_image_tokens: int = 8
    # > 0: a learned (text_pos_embed_len, hidden) position table added to the text stream. Off in the
    # release (T5 carries the positions); from-scratch models need it to tell the slots of an all-[MASK]
    # caption apart. Not a diffusers option: exported as an extra config key and state dict entry.
    text_pos_embed_len: int = 0

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclasses.dataclass(frozen=True)
class T5Config(_Config):
    """T5 v1.1 encoder. Defaults: T5-XXL (diffusers' text_encoder_3)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "gated-gelu" (v1.1) or "relu" (original T5)


@dataclasses.dataclass(frozen=True)
class VAEConfig(_Config):
    """SD3 AutoencoderKL. Defaults: SD3's 16-channel VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    shift_factor: float = 0.0609
    scaling_factor: float = 1.5305


# Keys of diffusers/transformers config.json files that describe nothing we build.
_IGNORED_SOURCE_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "architectures",
                        "transformers_version", "torch_dtype", "dtype", "model_type"}


def mmdit_from_diffusers(config: Mapping[str, Any], vocab_size: int) -> MMDiTConfig:
    """MMDiTConfig from a diffusers SD3Transformer2DModel config.json (vocab from the text head)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    cap = config.get("caption_projection_dim", hidden)
    if cap != hidden:
        raise ValueError(f"transformer config: caption_projection_dim={cap} must equal the hidden size {hidden}")
    return MMDiTConfig(
        sample_size=config.get("sample_size", 128),
        patch_size=config.get("patch_size", 2),
        in_channels=config.get("in_channels", 16),
        out_channels=config.get("out_channels") or config.get("in_channels", 16),
        num_layers=config["num_layers"],
        num_attention_heads=config["num_attention_heads"],
        attention_head_dim=config["attention_head_dim"],
        joint_attention_dim=config["joint_attention_dim"],
        pos_embed_max_size=config.get("pos_embed_max_size") or 192,
        vocab_size=vocab_size,
        qk_norm=config.get("qk_norm"),
        dual_attention_layers=tuple(config.get("dual_attention_layers") or ()),
        text_pos_embed_len=config.get("text_pos_embed_len", 0),
    )


def mmdit_to_diffusers(cfg: MMDiTConfig) -> dict:
    """The diffusers config.json of a transformer with this architecture."""
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "joint_attention_dim": cfg.joint_attention_dim,
        "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "qk_norm": cfg.qk_norm,
        "dual_attention_layers": list(cfg.dual_attention_layers),
        "vocab_size": cfg.vocab_size,
        **({"text_pos_embed_len": cfg.text_pos_embed_len} if cfg.text_pos_embed_len else {}),
    }


def t5_from_transformers(config: Mapping[str, Any]) -> T5Config:
    """T5Config from a transformers T5EncoderModel config.json."""
    proj = config.get("feed_forward_proj", "relu")
    if proj not in ("gated-gelu", "relu"):
        raise ValueError(f"text encoder config: feed_forward_proj={proj!r}; supported: 'gated-gelu', 'relu'")
    return T5Config(
        vocab_size=config["vocab_size"],
        d_model=config["d_model"],
        d_kv=config["d_kv"],
        d_ff=config["d_ff"],
        num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=proj,
    )


def t5_to_transformers(cfg: T5Config) -> dict:
    """A transformers T5EncoderModel config.json for this architecture."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": cfg.feed_forward_proj,
        "dense_act_fn": "gelu_new" if cfg.feed_forward_proj == "gated-gelu" else "relu",
        "is_gated_act": cfg.feed_forward_proj == "gated-gelu",
        "is_encoder_decoder": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def vae_from_diffusers(config: Mapping[str, Any]) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKL config.json (SD3 options required)."""
    for key in ("use_quant_conv", "use_post_quant_conv"):
        if config.get(key, True):
            raise ValueError(f"vae config: {key}=true is not an SD3 VAE; expected false")
    for key in ("down_block_types", "up_block_types"):
        kinds = set(config.get(key, ()))
        expected = "DownEncoderBlock2D" if key.startswith("down") else "UpDecoderBlock2D"
        if kinds and kinds != {expected}:
            raise ValueError(f"vae config: {key}={sorted(kinds)}; expected only {expected}")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"vae config: act_fn={config['act_fn']!r}; expected 'silu'")
    return VAEConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config["latent_channels"],
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config.get("layers_per_block", 2),
        norm_num_groups=config.get("norm_num_groups", 32),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
        shift_factor=config.get("shift_factor") or 0.0,
        scaling_factor=config.get("scaling_factor", 1.0),
    )


def vae_to_diffusers(cfg: VAEConfig) -> dict:
    """The diffusers AutoencoderKL config.json for this architecture."""
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "act_fn": "silu",
        "mid_block_add_attention": cfg.mid_block_add_attention,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "shift_factor": cfg.shift_factor,
        "scaling_factor": cfg.scaling_factor,
        "sample_size": 1024,
    }
