"""Models, optimizer and the train state, created directly sharded.

The train state is a plain pytree (dicts of arrays), so optax, jit and Orbax
all see the same thing:
  step       int32 ()        optimizer steps taken (skipped non-finite steps count)
  params     {"transformer": ..., "text_encoder": ...}  trainable float32 master weights
  opt_state  optax state of `params`
  ema        exponential moving average of `params` (or None when ema.decay == 0)
  rng        uint32 (2,)     base key; step k uses fold_in(rng, k)
  nonfinite  int32 ()        how many updates were skipped for a non-finite loss
Frozen weights (T5, the VAE) live beside it in `frozen`, same layout. Frozen kernels and T5's
embedding table are stored in `model.frozen_dtype` (default: the compute dtype, so bf16 runs hold
T5-XXL in 9.5 GB instead of 19); the networks cast them to the compute dtype on use anyway, so
this changes no result. Norm scales, biases and small tables stay float32.

T5 is frozen except what `config.model.text_encoder_trainable` says:
  "mask_row" (default): `params["text_encoder"]` is {"mask_row": float32 (1, d_model)}, the mask
     token's input embedding, with its own optimizer state and EMA; T5 reads it in place of the
     table's row (T5Encoder.embed). Readers of a workdir fold it back into the table
     (models.t5.fold_mask_row), so exported / loaded weights look as before.
  "none": nothing of T5 trains;  "all": every T5 parameter trains.
Checkpoints written before the mask row had its own parameter (the whole table in `params`) do not
restore into this layout: the run stops with one line saying so (training/checkpointing.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import traversals

from dual_diffusion.models.configs import MMDiTConfig, Runtime, T5Config, VAEConfig
from dual_diffusion.sharding import state_shardings

TRAINABLE_T5 = ("mask_row", "none", "all")


# --------------------------------------------------------------------------- model registry
def _build_transformer(cfg, runtime, rngs):
    from dual_diffusion.models.mmdit import MMDiT
    return MMDiT(MMDiTConfig.from_dict(cfg), runtime, rngs=rngs)


def _build_text_encoder(cfg, runtime, rngs):
    from dual_diffusion.models.t5 import T5Encoder
    return T5Encoder(T5Config.from_dict(cfg), runtime, rngs=rngs)


def _build_vae(cfg, runtime, rngs):
    from dual_diffusion.models.vae import AutoencoderKL
    return AutoencoderKL(VAEConfig.from_dict(cfg), runtime, rngs=rngs)


# Networks are found by name; a test may register a stand-in under a new name.
BUILDERS: dict[str, Callable[..., nnx.Module]] = {
    "transformer": _build_transformer,
    "text_encoder": _build_text_encoder,
    "vae": _build_vae,
}


def model_configs(config) -> dict[str, dict]:
    """{name: architecture dict} of the networks this config builds (no VAE in pixel space)."""
    out = {"transformer": config.model.transformer.to_dict(), "text_encoder": config.model.text_encoder.to_dict()}
    if config.model.latent_space == "vae":
        out["vae"] = config.model.vae.to_dict()
    return out


def runtime_from(config) -> Runtime:
    return Runtime.from_dict(config.runtime.to_dict())


def build_models(arch: dict[str, dict], runtime: Runtime, seed: int) -> dict[str, nnx.Module]:
    """All networks, each with its own RNG stream (so sizes of one never change another)."""
    return {name: BUILDERS[name](cfg, runtime, nnx.Rngs(seed + 1000 * i)) for i, (name, cfg) in enumerate(arch.items())}


# --------------------------------------------------------------------------- trainable / frozen split
def _flat(tree) -> dict[tuple, Any]:
    return traversals.flatten_mapping(tree) if tree else {}


def _unflat(flat: dict[tuple, Any]) -> dict:
    return traversals.unflatten_mapping(flat) if flat else {}


def embedding_path(t5_params_flat: dict[tuple, Any], t5_cfg: dict) -> tuple:
    """Path of T5's token embedding: the one parameter of shape (vocab_size, d_model)."""
    shape = (t5_cfg["vocab_size"], t5_cfg["d_model"])
    hits = [p for p, v in t5_params_flat.items() if tuple(v.shape) == shape]
    if len(hits) > 1:  # e.g. d_ff == vocab in a tiny model: prefer the one named like an embedding
        hits = [p for p in hits if any("embed" in str(k) or k == "shared" for k in p)]
    if len(hits) != 1:
        raise ValueError(f"text encoder: expected exactly one parameter of shape {shape} (the token embedding), "
                         f"found {hits}")
    return hits[0]


MASK_ROW = "mask_row"  # params["text_encoder"][MASK_ROW]: T5's trainable mask-token row, (1, d_model)


def _casts_on_use(path: tuple, embed: tuple | None) -> bool:
    """Leaves the networks cast to the compute dtype wherever they read them: kernels and T5's table."""
    return path[-1] == "kernel" or path == embed


@dataclasses.dataclass(frozen=True)
class Split:
    """How each network's nnx.State is cut into trainable `params` and `frozen` (pure dicts)."""

    graphdefs: dict[str, nnx.GraphDef]
    trainable: dict[str, frozenset]  # name -> set of flat paths that train
    embed_path: tuple | None  # T5's token-embedding path (None without a T5)
    mask_id: int | None = None  # set when only T5's mask row trains (params["text_encoder"][MASK_ROW])
    frozen_dtype: str | None = None  # dtype of frozen kernels / T5's table (None: as stored)

    @property
    def trains_mask_row(self) -> bool:
        return self.mask_id is not None

    def _partition(self, name: str, flat: dict) -> tuple[dict, dict]:
        keep = self.trainable.get(name, frozenset())
        return {k: v for k, v in flat.items() if k in keep}, {k: v for k, v in flat.items() if k not in keep}

    def cut(self, states: dict[str, Any]) -> tuple[dict, dict]:
        params, frozen = {}, {}
        for name, state in states.items():
            p, f = self._partition(name, _flat(nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state))
            embed = self.embed_path if name == "text_encoder" else None
            if embed is not None and self.trains_mask_row:
                p = {(MASK_ROW,): f[embed][self.mask_id:self.mask_id + 1].astype(jnp.float32)}
            if self.frozen_dtype:
                f = {k: v.astype(self.frozen_dtype) if _casts_on_use(k, embed) else v for k, v in f.items()}
            if p:
                params[name] = _unflat(p)
            frozen[name] = _unflat(f)
        return params, frozen

    def cut_shardings(self, params_sh: dict, frozen_sh: dict, row_sharding) -> tuple[dict, dict]:
        """Shardings laid out like `cut`'s output: trainable leaves from `params_sh`, frozen ones from
        `frozen_sh` (both per network, like the states), the mask row's `row_sharding`."""
        params, frozen = {}, {}
        for name in params_sh:
            p, _ = self._partition(name, _flat(params_sh[name]))
            _, f = self._partition(name, _flat(frozen_sh[name]))
            if name == "text_encoder" and self.trains_mask_row:
                p = {(MASK_ROW,): row_sharding}
            if p:
                params[name] = _unflat(p)
            frozen[name] = _unflat(f)
        return params, frozen

    def merge(self, name: str, params: dict, frozen: dict) -> nnx.Module:
        """The network of `name` over its frozen and trained weights (the mask row stays apart: see mask_row)."""
        trained = {k: v for k, v in _flat(params.get(name)).items() if k != (MASK_ROW,)}
        return nnx.merge(self.graphdefs[name], _unflat({**_flat(frozen.get(name)), **trained}))

    def mask_row(self, params: dict):
        """T5's trained mask row (1, d_model), or None when the table itself is what trains or nothing does."""
        return params.get("text_encoder", {}).get(MASK_ROW) if self.trains_mask_row else None

    def network_states(self, weights: dict, frozen: dict) -> dict[str, dict]:
        """Per-network pure state dicts for inference: frozen weights overlaid with `weights` (params or
        EMA), the mask row folded into T5's table."""
        from dual_diffusion.models.t5 import fold_mask_row

        out = {}
        for name in self.graphdefs:
            flat = {**_flat(frozen.get(name)),
                    **{k: v for k, v in _flat(weights.get(name)).items() if k != (MASK_ROW,)}}
            row = self.mask_row(weights) if name == "text_encoder" else None
            if row is not None:
                flat[self.embed_path] = fold_mask_row(flat[self.embed_path], row, self.mask_id)
            out[name] = _unflat(flat)
        return out


def make_split(abstract: dict[str, nnx.Module], arch: dict[str, dict], t5_trainable: str,
               mask_id: int | None = None, frozen_dtype: str | None = None) -> Split:
    if t5_trainable not in TRAINABLE_T5:
        raise ValueError(f"model.text_encoder_trainable={t5_trainable!r}; expected one of {TRAINABLE_T5}")
    graphdefs, trainable, embed = {}, {}, None
    for name, module in abstract.items():
        graphdefs[name] = nnx.graphdef(module)
        param_paths = frozenset(_flat(nnx.to_pure_dict(nnx.state(module, nnx.Param))))
        if name == "text_encoder":
            try:
                embed = embedding_path(_flat(nnx.to_pure_dict(nnx.state(module, nnx.Param))), arch["text_encoder"])
            except ValueError:
                if t5_trainable == "mask_row":
                    raise  # elsewhere the table only decides what is stored in frozen_dtype
        if name == "transformer" or (name == "text_encoder" and t5_trainable == "all"):
            trainable[name] = param_paths
    if t5_trainable == "mask_row" and embed is not None and mask_id is None:
        raise ValueError("text_encoder_trainable='mask_row' needs the mask token's id")
    row_id = mask_id if t5_trainable == "mask_row" and embed is not None else None
    return Split(graphdefs, trainable, embed, row_id, frozen_dtype)


def count_params(module: nnx.Module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# --------------------------------------------------------------------------- optimizer
def make_optimizer(opt, num_steps: int = 0) -> tuple[optax.GradientTransformation, Callable]:
    """Global-norm clip + AdamW with linear warmup, then constant / cosine / linear decay.

    Decay ends at optimizer.decay_steps, or at num_steps when that is 0.
    """
    warmup = max(int(opt.warmup_steps), 0)
    decay_steps = max(int(opt.decay_steps) or int(num_steps), warmup + 1)
    if opt.schedule == "constant":
        sched = optax.join_schedules([optax.linear_schedule(0.0, opt.lr, max(warmup, 1)), optax.constant_schedule(opt.lr)],
                                     [max(warmup, 1)]) if warmup else optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, opt.lr, warmup, decay_steps, opt.lr * opt.end_lr_factor)
    elif opt.schedule == "linear":
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, opt.lr, max(warmup, 1)),
             optax.linear_schedule(opt.lr, opt.lr * opt.end_lr_factor, decay_steps - warmup)], [max(warmup, 1)])
    else:
        raise ValueError(f"optimizer.schedule={opt.schedule!r}; expected 'constant', 'cosine' or 'linear'")
    tx = optax.chain(
        optax.clip_by_global_norm(opt.clip_norm) if opt.clip_norm > 0 else optax.identity(),
        optax.adamw(sched, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
    )
    return tx, sched


# --------------------------------------------------------------------------- abstract, sharded creation
def _pure_shardings(state: nnx.State, mesh, rules) -> dict:
    """NamedShardings laid out like nnx.to_pure_dict(state)."""
    sh = state_shardings(state, mesh, rules)
    flat = {path: s for path, s in sh.flat_state()} if hasattr(sh, "flat_state") else _flat(sh)
    return _unflat({k: (v.value if isinstance(v, nnx.Variable) else v) for k, v in flat.items()})


@dataclasses.dataclass
class Plan:
    """Everything static about a run: networks, split, optimizer, abstract state and its shardings."""

    arch: dict[str, dict]
    runtime: Runtime
    split: Split
    tx: optax.GradientTransformation
    schedule: Callable
    abstract_state: dict  # ShapeDtypeStructs of the train state
    state_shardings: dict
    abstract_frozen: dict
    frozen_shardings: dict
    param_counts: dict[str, int]
    init_fn: Callable  # () -> (state, frozen), jitted with out_shardings
    fresh_state: Callable  # params -> train state at step 0 (optimizer, EMA, RNG); for init_from
    mask_id: int
    use_ema: bool
    mesh: Any = None  # the mesh and logical rules activations are pinned to while the step is traced
    rules: tuple = ()
    frozen_placement: str = "fsdp"  # sharding.frozen_rules: "fsdp" | "replicated"


def _resolve_dtype(name: str, runtime: Runtime) -> str:
    """'' or 'compute' -> the runtime's compute dtype; a dtype name as it is."""
    return runtime.dtype if name in ("", "compute") else name


def make_plan(config, mesh, rules, mask_id: int) -> Plan:
    """Abstract init (nnx.eval_shape) -> shardings -> a jitted init with out_shardings (no full copy anywhere)."""
    from dual_diffusion.sharding import frozen_rules

    arch = model_configs(config)
    runtime = runtime_from(config)
    seed = int(config.seed)
    abstract = nnx.eval_shape(lambda: build_models(arch, runtime, seed))
    frozen_dtype = _resolve_dtype(config.model.get("frozen_dtype", ""), runtime)
    split = make_split(abstract, arch, config.model.text_encoder_trainable, mask_id,
                       None if frozen_dtype == runtime.param_dtype else frozen_dtype)
    counts = {name: count_params(m) for name, m in abstract.items()}
    tx, schedule = make_optimizer(config.optimizer, config.train.num_steps if "train" in config else 0)
    use_ema = float(config.ema.decay) > 0
    placement = config.get("sharding", {}).get("frozen_rules", "fsdp")

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    model_sh = {name: _pure_shardings(nnx.state(m), mesh, rules) for name, m in abstract.items()}
    frozen_model_sh = {name: _pure_shardings(nnx.state(m), mesh, frozen_rules(rules, placement))
                       for name, m in abstract.items()}
    params_sh, frozen_sh = split.cut_shardings(model_sh, frozen_model_sh, replicated)

    def fresh_state(params):
        return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema=jax.tree.map(jnp.copy, params) if use_ema else None,
                    rng=jax.random.key_data(jax.random.key(seed + 1)), nonfinite=jnp.zeros((), jnp.int32))

    def init():
        models = build_models(arch, runtime, seed)
        params, frozen = split.cut({name: nnx.state(m) for name, m in models.items()})
        return fresh_state(params), frozen

    abstract_state, abstract_frozen = jax.eval_shape(init)
    # Optimizer moments are laid out like the params; shard them the same way, scalars replicated.
    opt_sh = _like_params(abstract_state["opt_state"], abstract_state["params"], params_sh, replicated)
    state_sh = dict(step=replicated, params=params_sh, opt_state=opt_sh, ema=params_sh if use_ema else None,
                    rng=replicated, nonfinite=replicated)
    init_fn = jax.jit(init, out_shardings=(state_sh, frozen_sh))
    add = lambda tree, sh: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
    return Plan(arch, runtime, split, tx, schedule, add(abstract_state, state_sh), state_sh,
                add(abstract_frozen, frozen_sh), frozen_sh, counts, init_fn, fresh_state, mask_id, use_ema,
                mesh=mesh, rules=tuple(tuple(r) for r in rules), frozen_placement=placement)


def _like_params(opt_state, params, params_sh, replicated):
    """Shardings for an optax state: any subtree shaped like `params` gets the params' shardings."""
    p_struct = jax.tree.structure(params)

    def visit(node):
        if jax.tree.structure(node) == p_struct and node is not None:
            return params_sh
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[visit(c) for c in node])
        if isinstance(node, (tuple, list)):
            return type(node)(visit(c) for c in node)
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        return jax.tree.map(lambda _: replicated, node)

    return visit(opt_state)
