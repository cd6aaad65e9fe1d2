"""The three networks of a D-DiT checkpoint as the converter, exporter and loader see them.

A component names its diffusers subfolder and weight-file stem, how its
config.json becomes our config (and back), its key map and its constructor.
Components are found by name in COMPONENTS; network modules are imported on
use, so this file loads without them.

On-disk layout of a converted checkpoint (written by convert_to_jax.py):
  DST/dual_diffusion.json   format tag, configs, dtypes, new/dropped keys, tokenizer info (mask id, and the
                            pad token the folder declares: the release pads prompts with it)
  DST/params/<component>/   one Orbax checkpoint per component: nested dict of arrays
  DST/tokenizer/            copy of the source's T5 tokenizer folder (tokenizer_3/ or tokenizer/: spiece.model, ...)
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from dual_diffusion.models import configs as C

FORMAT = "dual_diffusion/converted"
FORMAT_VERSION = 1
INFO_FILE = "dual_diffusion.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"

Path_ = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Component:
    name: str             # our name (key in the bundle and in dual_diffusion.json)
    subfolder: str        # diffusers folder name the export writes (conversion finds folders by class: layout.py)
    stem: str             # weight file stem: <stem>.safetensors or <stem>.safetensors.index.json
    config_cls: type
    model: str            # "module:Class"
    rules: str            # "module:function" returning list[Rule] for a config
    to_source_config: Callable[[Any], dict]
    library: tuple[str, str]  # model_index.json entry

    def build_abstract(self, cfg, runtime=C.Runtime()) -> nnx.Module:
        cls = _import(self.model)
        return nnx.eval_shape(lambda: cls(cfg, runtime, rngs=nnx.Rngs(0)))

    def build_cls(self):
        return _import(self.model)

    def key_rules(self, cfg) -> list:
        return _import(self.rules)(cfg)


def _import(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


COMPONENTS: dict[str, Component] = {
    "transformer": Component("transformer", "transformer", "diffusion_pytorch_model", C.MMDiTConfig,
                             "dual_diffusion.models.mmdit:MMDiT", "dual_diffusion.convert.mmdit_keys:mmdit_rules",
                             C.mmdit_to_diffusers, ("diffusers", "SD3Transformer2DModel")),
    "text_encoder": Component("text_encoder", "text_encoder_3", "model", C.T5Config,
                              "dual_diffusion.models.t5:T5Encoder", "dual_diffusion.convert.t5_keys:t5_rules",
                              C.t5_to_transformers, ("transformers", "T5EncoderModel")),
    "vae": Component("vae", "vae", "diffusion_pytorch_model", C.VAEConfig,
                     "dual_diffusion.models.vae:AutoencoderKL", "dual_diffusion.convert.vae_keys:vae_rules",
                     C.vae_to_diffusers, ("diffusers", "AutoencoderKL")),
}


def flat_variables(model_or_state) -> dict[Path_, nnx.Variable]:
    """path -> Variable of a module's (abstract) state, in the key-map path convention."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return {tuple(path): var for path, var in nnx.to_flat_state(state)}


def path_name(path: Path_) -> str:
    """A readable, reversible-enough name of a state path (for messages and JSON)."""
    return ".".join(str(p) for p in path)


def nest(flat: dict[Path_, Any]) -> dict:
    """{path: leaf} -> nested dict with string keys (Orbax's tree of a component)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = leaf
    return tree


def unnest(tree: dict, paths: list[Path_]) -> dict[Path_, Any]:
    """The inverse of nest for known paths; a path absent from the tree raises, naming it."""
    out = {}
    for path in paths:
        node = tree
        for part in path:
            if not isinstance(node, dict) or str(part) not in node:
                raise KeyError(f"checkpoint has no entry for parameter {path_name(path)!r}")
            node = node[str(part)]
        out[path] = node
    return out


# Orbax (0.12) holds about two copies of whatever one save/restore call handles, so a component
# is stored as several Orbax checkpoints of at most GROUP_BYTES each (params/<name>/<group>/, listed
# in params/<name>/groups.json); peak RAM then stays near 2 x GROUP_BYTES above the result.
GROUP_BYTES = 512 * 2**20
GROUPS_FILE = "groups.json"


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _groups(flat: dict[Path_, Any]) -> list[list[Path_]]:
    groups, size = [[]], 0
    for path, leaf in flat.items():
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if groups[-1] and size + nbytes > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += nbytes
    return groups


def save_flat(directory: Path, flat: dict[Path_, np.ndarray]) -> None:
    """Saves one component (numpy arrays or memmaps, any dtypes) as Orbax checkpoints of bounded size."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    groups = _groups(flat)
    for i, group in enumerate(groups):
        _checkpointer().save(directory / f"{i:05d}", args=ocp.args.PyTreeSave(nest({p: flat[p] for p in group})))
    (directory / GROUPS_FILE).write_text(json.dumps([[path_name(p) for p in g] for g in groups]))


def _restore_groups(directory: Path, paths: list[Path_], restore_args: Callable[[Path_], Any],
                    targets: dict[Path_, Any] | None = None) -> dict[Path_, Any]:
    import orbax.checkpoint as ocp

    directory = _folder(directory)
    if not (directory / GROUPS_FILE).is_file():
        raise FileNotFoundError(f"checkpoint component {directory}: missing {GROUPS_FILE} (not a converted component)")
    by_name = {path_name(p): p for p in paths}
    groups = json.loads((directory / GROUPS_FILE).read_text())
    stored = [n for g in groups for n in g]
    unknown, missing = sorted(set(stored) - set(by_name)), sorted(set(by_name) - set(stored))
    if unknown or missing:
        raise ValueError(f"checkpoint component {directory} does not match the network: parameters missing "
                         f"from the checkpoint {missing[:10]}, unexpected in it {unknown[:10]}")
    out = {}
    for i, names in enumerate(groups):
        group = [by_name[n] for n in names]
        item = nest({p: targets[p] for p in group}) if targets is not None else None
        tree = _checkpointer().restore(directory / f"{i:05d}", args=ocp.args.PyTreeRestore(
            item=item, restore_args=nest({p: restore_args(p) for p in group})))
        out.update(unnest(tree, group))
    return out


def restore_flat(directory: Path, targets: dict[Path_, jax.ShapeDtypeStruct]) -> dict[Path_, jax.Array]:
    """Restores one component; each target gives the shape, the dtype to cast to and the sharding."""
    import orbax.checkpoint as ocp

    def args(p):
        t = targets[p]
        return ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)

    return _restore_groups(directory, list(targets), args, targets)


def restore_numpy(directory: Path, paths: list[Path_]) -> dict[Path_, np.ndarray]:
    """Restores one component as host numpy arrays in their stored dtypes (for export)."""
    import orbax.checkpoint as ocp

    return _restore_groups(directory, paths, lambda p: ocp.RestoreArgs(restore_type=np.ndarray))


def _folder(path):
    """A converted folder as an etils.epath.Path: local made absolute (Orbax), gs:// kept as it is."""
    from dual_diffusion.checkpoints.paths import workdir_path

    return workdir_path(path)


def read_info(path: Path) -> dict:
    info_file = _folder(path) / INFO_FILE
    try:
        info = json.loads(info_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{info_file}: cannot read the checkpoint description ({e})") from None
    if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
        raise ValueError(f"{info_file}: format {info.get('format')!r} v{info.get('version')!r}; "
                         f"expected {FORMAT!r} v{FORMAT_VERSION}")
    return info
