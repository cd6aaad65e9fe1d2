"""How one source tensor maps onto one parameter of our networks, and back.

Each network ships a key map `list[Rule]` (convert/mmdit_keys.py, t5_keys.py,
vae_keys.py). A rule names the PyTorch key, the path of the parameter in the
network's `nnx.State` (as `nnx.to_flat_state` gives it) and the layout change.
Layout changes are exact permutations, so conversion and export round-trip bit
for bit.
"""
from __future__ import annotations

import dataclasses

import numpy as np

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
