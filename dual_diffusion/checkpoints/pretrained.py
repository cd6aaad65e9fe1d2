"""load_pretrained: a converted checkpoint or a training workdir -> jitted networks.

    bundle = dual_diffusion.load_pretrained(DST, runtime=Runtime(), mesh=None, rules=None)
    velocity, logits = bundle.transformer(latents_NHWC_or_None, text_hidden_BxLx4096, timestep_B)
    hidden = bundle.text_encoder(token_ids_BxL)
    mean = bundle.vae.encode(images_NHWC); images = bundle.vae.decode(latents_NHWC)
    bundle.tokenizer, bundle.configs[name], bundle.graphdefs[name], bundle.states[name]

Parameters are restored in `runtime.param_dtype` whatever dtype they were stored
in; with a mesh each parameter is restored directly into its sharding
(dual_diffusion.sharding.state_shardings with `rules`, default DEFAULT_RULES).
Sources are found by what a folder contains (SOURCES); add a loader there for
other formats. `path` may be local or a URL (gs://bucket/run): every file is
read through etils.epath and Orbax (the tokenizer through a local copy).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from dual_diffusion.convert import components as comp
from dual_diffusion.models.configs import Runtime
from dual_diffusion.tokenizer import Tokenizer
from dual_diffusion.checkpoints.paths import local_copy, workdir_path


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

    path: epath.Path
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


def abstract_state(name: str, cfg, runtime: Runtime = Runtime()) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of shapes and dtypes) of one network; parameters in runtime.param_dtype, as loaded."""
    graphdef, state = nnx.split(comp.COMPONENTS[name].build_abstract(cfg, runtime))
    dtype = jnp.dtype(runtime.param_dtype)
    return graphdef, jax.tree.map(
        lambda v: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, dtype)) if isinstance(v, nnx.Param) else v,
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def read_configs(path, components: Sequence[str] = ("transformer", "text_encoder", "vae")) -> dict[str, Any]:
    """{name: architecture config} of the networks `path` holds (those of `components`), no weights read."""
    import json

    path = workdir_path(path)
    if _is_converted(path):
        table = {n: c["config"] for n, c in comp.read_info(path)["components"].items()}
    elif _is_workdir(path):
        table = json.loads((path / "model.json").read_text())
    else:
        raise ValueError(f"{path} is neither a converted checkpoint nor a training workdir")
    return {n: comp.COMPONENTS[n].config_cls.from_dict(table[n]) for n in components if n in table}


def state_bytes(states: Any) -> int:
    """Bytes of every array in a pytree of (abstract) states."""
    leaves = jax.tree.leaves(states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    values = [v.get_value() if isinstance(v, nnx.Variable) else v for v in leaves]
    return int(sum(np.prod(a.shape, dtype=np.int64) * jnp.dtype(a.dtype).itemsize for a in values))


def _restore_component(path: epath.Path, component: comp.Component, cfg, runtime: Runtime, mesh, rules):
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


def _attach_callables(bundle: PretrainedBundle) -> None:
    """Jitted transformer / text_encoder / vae handles over the bundle's states."""
    if "transformer" in bundle.states:
        bundle.transformer = _jitted(*bundle.module("transformer"), "__call__")
    if "text_encoder" in bundle.states:
        bundle.text_encoder = _jitted(*bundle.module("text_encoder"), "__call__")
    if "vae" in bundle.states:
        cfg = bundle.configs["vae"]
        bundle.vae = VAEHandle(encode=_jitted(*bundle.module("vae"), "encode"),
                               decode=_jitted(*bundle.module("vae"), "decode"), config=cfg,
                               shift_factor=cfg.shift_factor, scaling_factor=cfg.scaling_factor)


def _load_converted(path: epath.Path, runtime: Runtime, mesh, rules, components: Sequence[str]) -> PretrainedBundle:
    info = comp.read_info(path)
    tok = info["tokenizer"]
    bundle = PretrainedBundle(path=path, tokenizer=_tokenizer(path / tok["folder"] / tok["model_file"]),
                              configs={}, graphdefs={}, states={}, info=info)
    for name in components:
        if name not in comp.COMPONENTS or name not in info["components"]:
            raise KeyError(f"{path}: no component {name!r}; the checkpoint has {sorted(info['components'])}")
        component = comp.COMPONENTS[name]
        cfg = component.config_cls.from_dict(info["components"][name]["config"])
        graphdef, state = _restore_component(path, component, cfg, runtime, mesh, rules)
        bundle.configs[name], bundle.graphdefs[name], bundle.states[name] = cfg, graphdef, state
    _attach_callables(bundle)
    return bundle


def _tokenizer(model_file: epath.Path) -> Tokenizer:
    """The SentencePiece model at `model_file` (read through a local copy when it is remote); its
    `model_file` names where it came from."""
    tokenizer = Tokenizer(local_copy(model_file))
    tokenizer.model_file = model_file
    return tokenizer


def _is_converted(path: epath.Path) -> bool:
    return (path / comp.INFO_FILE).is_file()


def _is_workdir(path: epath.Path) -> bool:
    return (path / "model.json").is_file() and (path / "checkpoints").is_dir()


def _workdir_tokenizer(path: epath.Path, recorded: str) -> Tokenizer:
    """The tokenizer model.json names: as recorded, else relative to the workdir, else by name in it
    (a moved workdir keeps working)."""
    name = epath.Path(recorded).name
    candidates = ([epath.Path(recorded), path / recorded, path / name, path / "tokenizer" / name]
                  if recorded else [])
    for candidate in candidates:
        try:
            found = candidate.is_file()
        except (ImportError, OSError):  # a gs:// name where gcsfs is missing (a workdir copied off the bucket)
            found = False
        if found:
            return _tokenizer(candidate)
    raise FileNotFoundError(f"load_pretrained: the tokenizer model {recorded!r} recorded in {path}/model.json "
                            f"was found neither as given nor inside {path}")


def _restore_newest(directory: epath.Path) -> tuple[int, dict]:
    """(step, train state) of the newest complete checkpoint that restores; older ones are tried in turn
    when a newer one is damaged (nothing is moved: a running trainer may own the workdir)."""
    import warnings

    import orbax.checkpoint as ocp

    steps = sorted(ocp.CheckpointManager(directory).all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"load_pretrained: {directory} holds no complete checkpoint yet")
    errors = []
    with ocp.StandardCheckpointer() as ckptr:
        for step in steps:
            try:
                return step, ckptr.restore(directory / str(step) / "state")
            except Exception as e:  # noqa: BLE001  (any read failure: try the next older step)
                errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                warnings.warn(f"load_pretrained: checkpoint {directory / str(step)} does not restore "
                              f"({errors[-1]}); trying an older step", stacklevel=2)
    raise ValueError(f"load_pretrained: no checkpoint in {directory} restores ({'; '.join(errors)})")


def _load_workdir(path: epath.Path, runtime: Runtime, mesh, rules, components: Sequence[str]) -> PretrainedBundle:
    """The latest checkpoint of a training workdir: EMA weights when the run keeps them, else the params.

    A network's state = its trained part (checkpoints/<step>/state) + its frozen part
    (WORKDIR/frozen, or the converted checkpoint the run started from).
    """
    import json

    import orbax.checkpoint as ocp
    from flax.nnx import traversals

    info = json.loads((path / "model.json").read_text())
    step, state = _restore_newest(path / "checkpoints")
    with ocp.StandardCheckpointer() as ckptr:
        frozen_dir = path / "frozen"
        frozen = ckptr.restore(frozen_dir) if frozen_dir.exists() else None
    trained = state.get("ema") or state["params"]
    base = None
    if frozen is None:
        if not info.get("init_from"):
            raise FileNotFoundError(f"load_pretrained: {path} has neither frozen/ nor an init_from checkpoint")
        base = load_pretrained(info["init_from"], runtime, None, None, components)
    tokenizer = base.tokenizer if base is not None else _workdir_tokenizer(path, info.get("tokenizer", ""))
    sizes = {}
    if (path / "config.json").is_file():  # the sizes the run trained at: defaults for sampling
        data = json.loads((path / "config.json").read_text()).get("data", {})
        sizes = {k: data[k] for k in ("image_size", "text_length") if k in data}
    bundle = PretrainedBundle(path=path, tokenizer=tokenizer, configs={}, graphdefs={}, states={},
                              info=dict(info, **sizes, step=int(step),
                                        weights="ema" if state.get("ema") else "params"))
    present = [name for name in components if name in info]
    for name in present:
        component = comp.COMPONENTS[name]
        cfg = component.config_cls.from_dict(info[name])
        graphdef, abstract_state = nnx.split(component.build_abstract(cfg, runtime))
        variables = comp.flat_variables(abstract_state)
        # Orbax restores list indices as strings: match paths on their string form.
        key = lambda p: tuple(map(str, p))
        flat = ({key(p): v for p, v in traversals.flatten_mapping(frozen.get(name) or {}).items()}
                if frozen is not None else
                {key(p): np.asarray(v[...]) for p, v in comp.flat_variables(base.states[name]).items()})
        flat.update({key(p): v for p, v in traversals.flatten_mapping(trained.get(name) or {}).items()})
        flat = {p: flat[key(p)] for p in variables if key(p) in flat}
        missing = sorted(map(str, set(variables) - set(flat)))
        if missing:
            raise KeyError(f"load_pretrained: {path} (step {step}) lacks {name} variables {missing[:8]}")
        if mesh is None:
            shard = lambda p: jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            from dual_diffusion.sharding import DEFAULT_RULES, state_shardings

            shard = lambda p: state_shardings(variables[p], mesh, rules or DEFAULT_RULES)
        arrays = {p: jax.device_put(jnp.asarray(flat[p], jnp.dtype(runtime.param_dtype)
                                                if isinstance(v, nnx.Param) else v.get_value().dtype), shard(p))
                  for p, v in variables.items()}
        bundle.configs[name], bundle.graphdefs[name] = cfg, graphdef
        bundle.states[name] = nnx.from_flat_state([(p, v.replace(arrays[p])) for p, v in variables.items()])
    _attach_callables(bundle)
    return bundle


# (description, detect(path) -> bool, load(path, runtime, mesh, rules, components) -> PretrainedBundle),
# tried in order.
SOURCES: list[tuple[str, Callable[[epath.Path], bool], Callable[..., PretrainedBundle]]] = [
    (f"converted checkpoint ({comp.INFO_FILE} + {comp.PARAMS_DIR}/)", _is_converted, _load_converted),
    ("training workdir (model.json + checkpoints/)", _is_workdir, _load_workdir),
]


def load_pretrained(path, runtime: Runtime = Runtime(), mesh: jax.sharding.Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] | None = None,
                    components: Sequence[str] = ("transformer", "text_encoder", "vae")) -> PretrainedBundle:
    """Loads the networks of `path` (see the module docstring); `components` selects a subset."""
    path = workdir_path(path)  # absolute when local (Orbax takes absolute paths only); gs:// as it is
    if not path.is_dir():
        raise FileNotFoundError(f"load_pretrained: {path} is not a folder")
    for _, detect, load in SOURCES:
        if detect(path):
            return load(path, runtime, mesh, rules, tuple(components))
    kinds = "; ".join(desc for desc, _, _ in SOURCES)
    raise ValueError(f"load_pretrained: {path} is none of the known sources: {kinds}. A diffusers folder must "
                     "first be converted with tools/convert_sd3_weights.py")
