"""How one source tensor maps onto one parameter of our networks, and back.

Each network ships a key map `list[Rule]` (convert/mmdit_keys.py, t5_keys.py,
vae_keys.py). A rule names the PyTorch key, the path of the parameter in the
network's `nnx.State` (as `nnx.to_flat_state` gives it) and the layout change.
Layout changes are exact permutations, so conversion and export round-trip bit
for bit.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

# kind -> (torch -> ours, ours -> torch), both pure permutations.
_LAYOUTS = {
    "copy": (lambda a: a, lambda a: a),
    # torch.nn.Linear weight (out, in) -> kernel (in, out)
    "linear": (lambda a: np.ascontiguousarray(a.T), lambda a: np.ascontiguousarray(a.T)),
    # torch Conv2d weight OIHW -> HWIO
    "conv": (lambda a: np.ascontiguousarray(a.transpose(2, 3, 1, 0)),
             lambda a: np.ascontiguousarray(a.transpose(3, 2, 0, 1))),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """source: PyTorch key; target: path in the network's flat nnx.State; kind: a key of _LAYOUTS.

    aliases: other keys that hold the same tensor in some files (tied weights,
    e.g. T5's `encoder.embed_tokens.weight` for `shared.weight`); any one present is enough.
    """

    source: str
    target: tuple[str | int, ...]
    kind: str = "copy"
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in _LAYOUTS:
            raise ValueError(f"key map rule {self.source!r}: unknown layout kind {self.kind!r}")

    def to_ours(self, array: np.ndarray) -> np.ndarray:
        return _LAYOUTS[self.kind][0](array)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return _LAYOUTS[self.kind][1](array)

    def torch_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.to_torch(np.empty(our_shape, dtype=np.uint8)).shape)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (tests); torch itself is never imported here
        value = value.detach().cpu().float().numpy() if str(value.dtype) == "torch.bfloat16" else value.detach().cpu().numpy()
    return np.asarray(value)


def load_torch_state(model: nnx.Module, state_dict: Mapping[str, Any], rules: Sequence[Rule], *,
                     strict: bool = True, allow_missing: Iterable[tuple] = ()) -> nnx.Module:
    """Writes a PyTorch-layout state dict (numpy arrays or torch tensors) into `model` in place.

    Every model variable must be covered by a rule (except `allow_missing`
    paths, e.g. the new parameters of a plain-SD3 initialisation); every rule
    must find its source or an alias; shapes must match after the layout
    change; with `strict`, every key of the state dict must be claimed.
    Errors name the key, path and shapes. Values are cast to each variable's
    dtype. Returns the model.
    """
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    targets = {r.target for r in rules}
    uncovered = sorted(map(str, set(flat) - targets - set(allow_missing)))
    if uncovered:
        raise KeyError(f"model variables with no rule: {uncovered[:8]}")
    unknown = sorted(map(str, targets - set(flat)))
    if unknown:
        raise KeyError(f"rule targets not in the model: {unknown[:8]}")
    claimed: set[str] = set()
    missing, updates = [], []
    for rule in rules:
        names = (rule.source, *rule.aliases)
        key = next((k for k in names if k in state_dict), None)
        if key is None:
            missing.append(rule.source)
            continue
        claimed.update(k for k in names if k in state_dict)
        var = flat[rule.target]
        value = rule.to_ours(_to_numpy(state_dict[key]))
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{key}: converted shape {tuple(value.shape)} does not fit {rule.target} "
                             f"of shape {tuple(var.shape)}")
        updates.append((rule.target, var.replace(jnp.asarray(value, dtype=var.dtype))))
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} tensor(s) the model needs: {missing[:8]}")
    unexpected = sorted(set(state_dict) - claimed)
    if strict and unexpected:
        raise KeyError(f"state dict has {len(unexpected)} tensor(s) no rule maps: {unexpected[:8]}")
    nnx.update(model, nnx.from_flat_state(updates))
    return model


def export_torch_state(model: nnx.Module, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """The inverse of load_torch_state: {PyTorch key: numpy array in PyTorch layout}."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    return {r.source: r.to_torch(np.asarray(flat[r.target][...])) for r in rules}
