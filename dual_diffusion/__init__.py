"""dual_diffusion: D-DiT, the Dual Diffusion Transformer, in JAX/Flax.

One MM-DiT generates images by rectified flow and text by masked (absorbing
state) diffusion. See README.md for the package map.
"""
import flax as _flax

# Parameters carry *logical* axis names as metadata; sharding is decided later
# by the config's rules (dual_diffusion/sharding.py), never at creation time.
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"


def load_pretrained(path, **kwargs):
    """Loads a converted checkpoint or a training workdir; see dual_diffusion.checkpoints.pretrained."""
    from dual_diffusion.checkpoints.pretrained import load_pretrained as _load

    return _load(path, **kwargs)
