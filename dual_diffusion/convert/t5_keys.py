"""Key map of transformers' T5EncoderModel state_dict onto dual_diffusion.models.t5.T5Encoder.

transformers ties `shared.weight` and `encoder.embed_tokens.weight`; its
state_dict holds both, while `save_pretrained` (transformers 5.23) writes only
`shared.weight`, and other writers may keep only the encoder's copy. One rule
with an alias accepts any of these. The relative position table lives in
transformers' layer 0 and beside the layers here (they all share it).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def _to_numpy(tensor: Any) -> np.ndarray:
    """numpy view of a numpy array or a torch tensor (bf16 tensors are widened to float32)."""
    if hasattr(tensor, "detach"):  # torch, without importing it
        tensor = tensor.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(tensor)


def _variable_at(model: nnx.Module, path: Sequence[str | int]) -> nnx.Variable:
    node: Any = model
    for i, part in enumerate(path):
        try:
            node = node[part] if isinstance(part, int) else getattr(node, part)
        except (AttributeError, IndexError, KeyError):
            raise KeyError(f"model has no parameter at {tuple(path)} (missing {part!r} at depth {i})") from None
    if not isinstance(node, nnx.Variable):
        raise KeyError(f"model path {tuple(path)} is a {type(node).__name__}, not a parameter")
    return node


def load_torch_state(model: nnx.Module, state_dict: Mapping[str, Any], rules: Sequence[Rule],
                     strict: bool = True) -> nnx.Module:
    """Copies a PyTorch state_dict (numpy arrays or torch tensors) into `model` in place, by `rules`.

    Every rule must find its source or one alias; every target must have the
    converted shape; with strict, every key of the state_dict must be claimed
    by a rule. Errors name the key, the path and the shapes. Values are cast to
    each parameter's dtype. Returns the model.
    """
    claimed: set[str] = set()
    missing = []
    for rule in rules:
        key = next((k for k in (rule.source, *rule.aliases) if k in state_dict), None)
        if key is None:
            missing.append(rule.source)
            continue
        claimed.update(k for k in (rule.source, *rule.aliases) if k in state_dict)
        var = _variable_at(model, rule.target)
        value = rule.to_ours(_to_numpy(state_dict[key]))
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{key}: converted shape {tuple(value.shape)} does not fit {rule.target} "
                             f"of shape {tuple(var.shape)}")
        var[...] = jnp.asarray(value, dtype=var.dtype)
    if missing:
        raise KeyError(f"state_dict lacks {len(missing)} tensor(s) the model needs: {missing[:8]}")
    unexpected = sorted(set(state_dict) - claimed)
    if strict and unexpected:
        raise KeyError(f"state_dict has {len(unexpected)} tensor(s) no rule maps: {unexpected[:8]}")
    return model


def export_torch_state(model: nnx.Module, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """The inverse of load_torch_state: {torch key: numpy array in PyTorch layout} (sources only)."""
    return {rule.source: rule.to_torch(np.asarray(_variable_at(model, rule.target)[...])) for rule in rules}
