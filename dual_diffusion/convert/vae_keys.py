"""Key map: diffusers AutoencoderKL state_dict <-> dual_diffusion.models.vae.AutoencoderKL.

One Rule per tensor (see convert/keymap.py). Conv2d weights are OIHW -> HWIO,
the mid-block attention projections are nn.Linear (out, in) -> (in, out),
biases and GroupNorm weights are copied (torch `weight` -> our `scale`).
"""
from __future__ import annotations

from dual_diffusion.convert.keymap import Rule
from dual_diffusion.models.configs import VAEConfig


def _conv(src: str, dst: tuple) -> list[Rule]:
    return [Rule(f"{src}.weight", dst + ("kernel",), "conv"), Rule(f"{src}.bias", dst + ("bias",))]


def _norm(src: str, dst: tuple) -> list[Rule]:
    return [Rule(f"{src}.weight", dst + ("scale",)), Rule(f"{src}.bias", dst + ("bias",))]


def _linear(src: str, dst: tuple, old: str) -> list[Rule]:
    return [Rule(f"{src}.weight", dst + ("kernel",), "linear", aliases=(f"{old}.weight",)),
            Rule(f"{src}.bias", dst + ("bias",), aliases=(f"{old}.bias",))]


def _resnet(src: str, dst: tuple, in_ch: int, out_ch: int) -> list[Rule]:
    rules = _norm(f"{src}.norm1", dst + ("norm1",)) + _conv(f"{src}.conv1", dst + ("conv1",))
    rules += _norm(f"{src}.norm2", dst + ("norm2",)) + _conv(f"{src}.conv2", dst + ("conv2",))
    if in_ch != out_ch:
        rules += _conv(f"{src}.conv_shortcut", dst + ("conv_shortcut",))
    return rules


def _mid_block(src: str, dst: tuple, channels: int, add_attention: bool) -> list[Rule]:
    rules = _resnet(f"{src}.resnets.0", dst + ("resnets", 0), channels, channels)
    if add_attention:
        a, d = f"{src}.attentions.0", dst + ("attention",)
        rules += _norm(f"{a}.group_norm", d + ("group_norm",))
        # Files written before diffusers renamed the VAE attention hold the same
        # Linear tensors as query/key/value/proj_attn; accepted as aliases.
        for name, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            rules += _linear(f"{a}.{name}", d + (name.split(".")[0],), f"{a}.{old}")
    rules += _resnet(f"{src}.resnets.1", dst + ("resnets", 1), channels, channels)
    return rules


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    """Every tensor of a diffusers AutoencoderKL (use_quant_conv=False, use_post_quant_conv=False)."""
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    rules = _conv("encoder.conv_in", ("encoder", "conv_in"))
    for i in range(n):
        src, dst = f"encoder.down_blocks.{i}", ("encoder", "down_blocks", i)
        for j in range(cfg.layers_per_block):
            in_ch = ch[max(i - 1, 0)] if j == 0 else ch[i]
            rules += _resnet(f"{src}.resnets.{j}", dst + ("resnets", j), in_ch, ch[i])
        if i < n - 1:
            rules += _conv(f"{src}.downsamplers.0.conv", dst + ("downsampler",))
    rules += _mid_block("encoder.mid_block", ("encoder", "mid_block"), ch[-1], cfg.mid_block_add_attention)
    rules += _norm("encoder.conv_norm_out", ("encoder", "conv_norm_out"))
    rules += _conv("encoder.conv_out", ("encoder", "conv_out"))

    rev = tuple(reversed(ch))
    rules += _conv("decoder.conv_in", ("decoder", "conv_in"))
    rules += _mid_block("decoder.mid_block", ("decoder", "mid_block"), rev[0], cfg.mid_block_add_attention)
    for i in range(n):
        src, dst = f"decoder.up_blocks.{i}", ("decoder", "up_blocks", i)
        for j in range(cfg.layers_per_block + 1):
            in_ch = rev[max(i - 1, 0)] if j == 0 else rev[i]
            rules += _resnet(f"{src}.resnets.{j}", dst + ("resnets", j), in_ch, rev[i])
        if i < n - 1:
            rules += _conv(f"{src}.upsamplers.0.conv", dst + ("upsampler",))
    rules += _norm("decoder.conv_norm_out", ("decoder", "conv_norm_out"))
    rules += _conv("decoder.conv_out", ("decoder", "conv_out"))
    return rules
