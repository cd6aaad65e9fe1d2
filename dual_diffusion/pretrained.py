"""load_pretrained: a converted checkpoint (or, later, a training workdir) -> jitted networks.

    bundle = dual_diffusion.load_pretrained(DST, runtime=Runtime(), mesh=None, rules=None)
    velocity, logits = bundle.transformer(latents_NHWC_or_None, text_hidden_BxLx4096, timestep_B)
    hidden = bundle.text_encoder(token_ids_BxL)
    mean = bundle.vae.encode(images_NHWC); images = bundle.vae.decode(latents_NHWC)
    bundle.tokenizer, bundle.configs[name], bundle.graphdefs[name], bundle.states[name]

Parameters are restored in `runtime.param_dtype` whatever dtype they were stored
in; with a mesh each parameter is restored directly into its sharding
(dual_diffusion.sharding.state_shardings with `rules`, default DEFAULT_RULES).
Sources are found by what a folder contains (SOURCES); add a loader there for
other formats.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dual_diffusion.convert import components as comp
from dual_diffusion.models.configs import Runtime
from dual_diffusion.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class VAEHandle:
    """Jitted encode (-> posterior mean, raw latents) / decode (raw latents -> images in [-1, 1]), NHWC."""

    encode: Callable[[jax.Array], jax.Array]
    decode: Callable[[jax.Array], jax.Array]
    config: Any
    shift_factor: float
    scaling_factor: float


@dataclasses.dataclass
class PretrainedBundle:
    """The networks of a checkpoint as jitted callables, plus their (graphdef, state) for training."""

    path: Path
    tokenizer: Tokenizer
    configs: dict[str, Any]
    graphdefs: dict[str, nnx.GraphDef]
    states: dict[str, nnx.State]
    transformer: Callable | None = None
    text_encoder: Callable | None = None
    vae: VAEHandle | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def module(self, name: str) -> tuple[nnx.GraphDef, nnx.State]:
        if name not in self.states:
            raise KeyError(f"{self.path}: component {name!r} not loaded; have {sorted(self.states)}")
        return self.graphdefs[name], self.states[name]

    def model(self, name: str) -> nnx.Module:
        """A stateful nnx.Module (shares the arrays of the bundle's state)."""
        return nnx.merge(*self.module(name))


def _jitted(graphdef: nnx.GraphDef, state: nnx.State, method: str) -> Callable:
    """fn(*args) = merge(graphdef, state).method(*args), jitted; the state is an argument, not a constant."""

    @jax.jit
    def run(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return functools.partial(run, state)


def _restore_component(path: Path, component: comp.Component, cfg, runtime: Runtime, mesh, rules):
    abstract = component.build_abstract(cfg, runtime)
    graphdef, abstract_state = nnx.split(abstract)
    variables = comp.flat_variables(abstract_state)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = {p: device for p in variables}
    else:
        from dual_diffusion.sharding import DEFAULT_RULES, state_shardings

        shardings = {p: state_shardings(v, mesh, rules or DEFAULT_RULES) for p, v in variables.items()}
    # Buffers (fixed grids) keep their own dtype; parameters come back in runtime.param_dtype.
    targets = {p: jax.ShapeDtypeStruct(v.get_value().shape,
                                       jnp.dtype(runtime.param_dtype) if isinstance(v, nnx.Param)
                                       else v.get_value().dtype, sharding=shardings[p])
               for p, v in variables.items()}
    arrays = comp.restore_flat(path / comp.PARAMS_DIR / component.name, targets)
    state = nnx.from_flat_state([(p, v.replace(arrays[p])) for p, v in variables.items()])
    return graphdef, state


def _load_converted(path: Path, runtime: Runtime, mesh, rules, components: Sequence[str]) -> PretrainedBundle:
    info = comp.read_info(path)
    tok = info["tokenizer"]
    bundle = PretrainedBundle(path=path, tokenizer=Tokenizer(path / tok["folder"] / tok["model_file"]),
                              configs={}, graphdefs={}, states={}, info=info)
    for name in components:
        if name not in comp.COMPONENTS or name not in info["components"]:
            raise KeyError(f"{path}: no component {name!r}; the checkpoint has {sorted(info['components'])}")
        component = comp.COMPONENTS[name]
        cfg = component.config_cls.from_dict(info["components"][name]["config"])
        graphdef, state = _restore_component(path, component, cfg, runtime, mesh, rules)
        bundle.configs[name], bundle.graphdefs[name], bundle.states[name] = cfg, graphdef, state
    if "transformer" in bundle.states:
        bundle.transformer = _jitted(*bundle.module("transformer"), "__call__")
    if "text_encoder" in bundle.states:
        bundle.text_encoder = _jitted(*bundle.module("text_encoder"), "__call__")
    if "vae" in bundle.states:
        cfg = bundle.configs["vae"]
        bundle.vae = VAEHandle(encode=_jitted(*bundle.module("vae"), "encode"),
                               decode=_jitted(*bundle.module("vae"), "decode"), config=cfg,
                               shift_factor=cfg.shift_factor, scaling_factor=cfg.scaling_factor)
    return bundle


def _is_converted(path: Path) -> bool:
    return (path / comp.INFO_FILE).is_file()


def _is_workdir(path: Path) -> bool:
    return (path / "model.json").is_file() and (path / "checkpoints").is_dir()


def _load_workdir(path: Path, *args) -> PretrainedBundle:
    # The layout is dual_diffusion/training/checkpointing.py's; its loader belongs in this table.
    raise NotImplementedError(f"load_pretrained: {path} is a training workdir (model.json + checkpoints/); "
                              "loading one is not implemented yet")


# (description, detect(path) -> bool, load(path, runtime, mesh, rules, components) -> PretrainedBundle),
# tried in order.
SOURCES: list[tuple[str, Callable[[Path], bool], Callable[..., PretrainedBundle]]] = [
    (f"converted checkpoint ({comp.INFO_FILE} + {comp.PARAMS_DIR}/)", _is_converted, _load_converted),
    ("training workdir (model.json + checkpoints/)", _is_workdir, _load_workdir),
]


def load_pretrained(path, runtime: Runtime = Runtime(), mesh: jax.sharding.Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] | None = None,
                    components: Sequence[str] = ("transformer", "text_encoder", "vae")) -> PretrainedBundle:
    """Loads the networks of `path` (see the module docstring); `components` selects a subset."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"load_pretrained: {path} is not a folder")
    for _, detect, load in SOURCES:
        if detect(path):
            return load(path, runtime, mesh, rules, tuple(components))
    kinds = "; ".join(desc for desc, _, _ in SOURCES)
    raise ValueError(f"load_pretrained: {path} is none of the known sources: {kinds}. A diffusers folder must "
                     "first be converted with tools/convert_sd3_weights.py")
