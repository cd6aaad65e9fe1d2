"""Key map of the D-DiT transformer: diffusers / release names <-> paths in our MMDiT state.

`mmdit_rules(cfg)` covers every key of a D-DiT release transformer (the layout
of /work/shared/bench/ref_ddit.py). `sd3_init_plan` maps a *plain* SD3/SD3.5
transformer onto the D-DiT model for stage-1 training (REFERENCE.md,
Checkpoint layout): its `norm_out`/`proj_out` become the image head, the last
block's text parts and the text head are new, and its pooled-text embedder
and the pre-only block's 2-way text norm are dropped.
"""
from __future__ import annotations

from typing import Iterable

from dual_diffusion.convert.keymap import Rule
from dual_diffusion.models.configs import MMDiTConfig

StatePath = tuple  # a key of nnx.to_flat_state(state)


def _linear(source: str, target: StatePath) -> list[Rule]:
    return [Rule(f"{source}.weight", target + ("kernel",), "linear"), Rule(f"{source}.bias", target + ("bias",))]


def _qkv(source: str, target: StatePath, names: tuple[str, str, str], norms: tuple[str, str] | None) -> list[Rule]:
    rules = []
    for name, ours in zip(names, ("q", "k", "v")):
        rules += _linear(f"{source}.{name}", target + (ours,))
    if norms is not None:
        for name, ours in zip(norms, ("norm_q", "norm_k")):
            rules.append(Rule(f"{source}.{name}.weight", target + (ours, "scale")))
    return rules


def _block_rules(cfg: MMDiTConfig, i: int) -> list[Rule]:
    src, dst = f"transformer_blocks.{i}", ("blocks", i)
    qk = cfg.qk_norm is not None
    rules = _linear(f"{src}.norm1.linear", dst + ("img_mod",))
    rules += _linear(f"{src}.norm1_context.linear", dst + ("txt_mod",))
    rules += _qkv(f"{src}.attn", dst + ("img_qkv",), ("to_q", "to_k", "to_v"), ("norm_q", "norm_k") if qk else None)
    rules += _qkv(f"{src}.attn", dst + ("txt_qkv",), ("add_q_proj", "add_k_proj", "add_v_proj"),
                  ("norm_added_q", "norm_added_k") if qk else None)
    rules += _linear(f"{src}.attn.to_out.0", dst + ("img_out",))
    rules += _linear(f"{src}.attn.to_add_out", dst + ("txt_out",))
    if i in cfg.dual_attention_layers:
        rules += _qkv(f"{src}.attn2", dst + ("attn2", "qkv"), ("to_q", "to_k", "to_v"),
                      ("norm_q", "norm_k") if qk else None)
        rules += _linear(f"{src}.attn2.to_out.0", dst + ("attn2", "out"))
    for stream, ours in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
        rules += _linear(f"{src}.{stream}.net.0.proj", dst + (ours, "fc1"))
        rules += _linear(f"{src}.{stream}.net.2", dst + (ours, "fc2"))
    return rules


def mmdit_rules(cfg: MMDiTConfig) -> list[Rule]:
    """Every key of a D-DiT transformer state dict -> our MMDiT state path (bijective)."""
    rules = [
        Rule("null_image_embd", ("null_image_embd",)),
        *([Rule("text_pos_embed", ("text_pos_embed",))] if cfg.text_pos_embed_len else []),
        Rule("pos_embed.pos_embed", ("pos_embed", "pos_embed")),
        Rule("pos_embed.proj.weight", ("pos_embed", "kernel"), "conv"),
        Rule("pos_embed.proj.bias", ("pos_embed", "bias")),
    ]
    rules += _linear("time_text_embed.timestep_embedder.linear_1", ("time_embed", "linear_1"))
    rules += _linear("time_text_embed.timestep_embedder.linear_2", ("time_embed", "linear_2"))
    rules += _linear("context_embedder", ("context_embedder",))
    for i in range(cfg.num_layers):
        rules += _block_rules(cfg, i)
    rules += _linear("image_norm_out.linear", ("image_out_mod",))
    rules += _linear("image_proj_out", ("image_out_proj",))
    rules += _linear("text_proj_out", ("text_out_proj",))  # text_norm_out has no parameters
    return rules


# Plain SD3 names of the D-DiT image head.
_SD3_RENAMES = (("image_norm_out.", "norm_out."), ("image_proj_out.", "proj_out."))


def sd3_init_plan(cfg: MMDiTConfig, source_keys: Iterable[str]) -> tuple[list[Rule], list[StatePath], list[str]]:
    """How a plain SD3/SD3.5 transformer state dict initialises a D-DiT MMDiT.

    Returns (rules_used with plain-SD3 sources, new target paths left at their
    fresh initialisation, dropped source keys). Raises, naming the keys, when
    the source is not a plain SD3 transformer of this architecture.
    """
    keys = set(source_keys)
    if "proj_out.weight" not in keys or "image_proj_out.weight" in keys:
        raise ValueError("sd3_init_plan: source has no `proj_out.weight` (or already has D-DiT heads); "
                         "a D-DiT checkpoint loads with mmdit_rules")
    last = f"transformer_blocks.{cfg.num_layers - 1}."
    # A context_pre_only last block has a 2-way AdaLN-continuous text norm under the same name
    # as our 6-way one, and no text output projection / MLP: those are new.
    fresh_prefixes = (last + "norm1_context.", last + "attn.to_add_out.", last + "ff_context.",
                      "text_proj_out.", "null_image_embd", "text_pos_embed")
    used, new = [], []
    for rule in mmdit_rules(cfg):
        source = rule.source
        for ours, theirs in _SD3_RENAMES:
            if source.startswith(ours):
                source = theirs + source[len(ours):]
        if source.startswith(fresh_prefixes):
            new.append(rule.target)
        elif source in keys:
            used.append(Rule(source, rule.target, rule.kind))
        else:
            raise ValueError(f"sd3_init_plan: SD3 key {source!r} (for {rule.target}) is missing from the source")
    dropped = sorted(keys - {r.source for r in used})
    expected_drop = ("time_text_embed.text_embedder.", last + "norm1_context.linear.")
    unexpected = [k for k in dropped if not k.startswith(expected_drop)]
    if unexpected:
        raise ValueError(f"sd3_init_plan: source keys {unexpected} have no place in the D-DiT model "
                         f"(num_layers={cfg.num_layers}, qk_norm={cfg.qk_norm}, "
                         f"dual_attention_layers={cfg.dual_attention_layers})")
    return used, new, dropped
