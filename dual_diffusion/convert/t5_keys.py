"""Key map of transformers' T5EncoderModel state_dict onto dual_diffusion.models.t5.T5Encoder.

transformers ties `shared.weight` and `encoder.embed_tokens.weight`; its
state_dict holds both, while `save_pretrained` (transformers 5.23) writes only
`shared.weight`, and other writers may keep only the encoder's copy. One rule
with an alias accepts any of these. The relative position table lives in
transformers' layer 0 and beside the layers here (they all share it).
"""
from __future__ import annotations

from dual_diffusion.convert.keymap import Rule
from dual_diffusion.models.configs import T5Config


def t5_rules(cfg: T5Config) -> list[Rule]:
    """Every T5EncoderModel tensor -> its path in nnx.state(T5Encoder(cfg))."""
    rules = [
        Rule("shared.weight", ("embedding",), "copy", aliases=("encoder.embed_tokens.weight",)),
        Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             ("relative_attention_bias",), "copy"),
        Rule("encoder.final_layer_norm.weight", ("final_norm", "scale"), "copy"),
    ]
    ff = ("wi_0", "wi_1", "wo") if cfg.feed_forward_proj == "gated-gelu" else ("wi", "wo")
    for i in range(cfg.num_layers):
        block = f"encoder.block.{i}.layer"
        rules.append(Rule(f"{block}.0.layer_norm.weight", ("layers", i, "attn_norm", "scale"), "copy"))
        for name in ("q", "k", "v", "o"):
            rules.append(Rule(f"{block}.0.SelfAttention.{name}.weight", ("layers", i, name, "kernel"), "linear"))
        rules.append(Rule(f"{block}.1.layer_norm.weight", ("layers", i, "ff_norm", "scale"), "copy"))
        for name in ff:
            rules.append(Rule(f"{block}.1.DenseReluDense.{name}.weight", ("layers", i, name, "kernel"), "linear"))
    return rules
