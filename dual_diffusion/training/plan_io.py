"""The glue train.py calls: tokenizer, vocabulary, batches, initial state, dry-run report.

Kept out of train.py so the entry point reads as its sections only.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dual_diffusion import sharding
from dual_diffusion.models.configs import Runtime
from dual_diffusion.checkpoints import paths
from dual_diffusion.training import checkpointing
from dual_diffusion.training.state import Plan

VOCAB_FROM_TOKENIZER = -1


# --------------------------------------------------------------------------- tokenizer and vocabulary
def get_tokenizer(config, workdir, dry_run: bool = False):
    """The run's tokenizer; the demo trains its own into WORKDIR/tokenizer (deterministic) on first use.

    `workdir`: a local path or an epath (paths.workdir_path). SentencePiece reads and writes local files only:
    for a gs:// workdir the model is trained into a local temporary folder and copied into the workdir,
    and read back through a local copy; `model_file` (what model.json records) stays the workdir's file.
    Multi-host: process 0 trains it, the others wait at a barrier before opening the file.
    """
    import tempfile

    from dual_diffusion.tokenizer import Tokenizer, train_sentencepiece

    if config.init_from:
        return None  # the converted checkpoint brings its tokenizer
    if config.tokenizer.train_corpus == "shapes":
        if dry_run:
            return None
        model_file, local = workdir / "tokenizer" / "spiece.model", paths.is_local(workdir)
        if not model_file.exists():
            from dual_diffusion.data.shapes import shapes_captions_corpus, world_of_run
            if jax.process_index() == 0:
                prefix = (workdir / "tokenizer" / "spiece" if local
                          else Path(tempfile.mkdtemp(prefix="dual_diffusion_tokenizer_")) / "spiece")
                corpus = shapes_captions_corpus(config.seed, 2000, world_of_run(config))
                trained = train_sentencepiece(corpus, prefix, config.tokenizer.train_vocab_size,
                                              model_type=config.tokenizer.get("train_model_type", "unigram"))
                if not local:
                    model_file.parent.mkdir(parents=True, exist_ok=True)
                    tmp = model_file.parent / f"{model_file.name}.tmp"  # readers never see a partial model
                    tmp.write_bytes(trained.read_bytes())
                    tmp.replace(model_file)
        from dual_diffusion import distributed
        distributed.barrier("dual_diffusion:tokenizer_written")  # every process reaches this (a shared workdir)
        if local:
            return Tokenizer(model_file)
        tokenizer = Tokenizer(paths.local_copy(model_file))
        tokenizer.model_file = model_file  # what model.json records: the workdir's file, not the local copy
        return tokenizer
    return None if dry_run else Tokenizer(config.tokenizer.model_file)


def resolve_vocab(config, tokenizer, bundle, dry_run: bool = False) -> None:
    """Fills vocab sizes of -1 from the tokenizer, and the architectures from a converted checkpoint.

    A dry run has no tokenizer: a trained one (tokenizer.train_corpus) is sized by
    tokenizer.train_vocab_size (the SentencePiece target; the real count can be a little lower).
    """
    with config.unlocked():
        if bundle is not None:
            for name, cfg in bundle.configs.items():
                arch = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.to_dict().items()}
                config.model[name].update(arch)
        for key in ("transformer", "text_encoder"):
            if config.model[key].vocab_size == VOCAB_FROM_TOKENIZER:
                if tokenizer is not None:
                    config.model[key].vocab_size = len(tokenizer)
                elif dry_run and config.tokenizer.train_corpus:
                    config.model[key].vocab_size = int(config.tokenizer.train_vocab_size)
                else:
                    raise ValueError(f"config.model.{key}.vocab_size=-1 needs a tokenizer (none loaded)")


def special_ids(config, tokenizer) -> tuple[int, int]:
    """(mask_id, eos_id): the tokenizer's, or T5's (<extra_id_0> = vocab - 1, EOS = 1) without one."""
    if tokenizer is not None:
        return tokenizer.mask_id, tokenizer.eos_id
    return config.model.transformer.vocab_size - 1, 1


def runtime_of(config) -> Runtime:
    return Runtime.from_dict(config.runtime.to_dict())


def components_of(config) -> tuple[str, ...]:
    return ("transformer", "text_encoder") + (("vae",) if config.model.latent_space == "vae" else ())


# --------------------------------------------------------------------------- model .. step
@dataclasses.dataclass
class Step:
    """What train.py's sections model .. step build (also compiled for a TPU slice by compile_report)."""

    plan: Plan
    loss_cfg: object  # training.loss.LossConfig
    abstract_batch: dict  # ShapeDtypeStructs with shardings of one global batch
    batch_shardings: dict
    train_step: object  # jitted step(state, frozen, batch) -> (state, metrics)
    spike_factor: float  # train.loss_spike_factor (0: the guard is off)


def build_step(config, mesh, rules, mask_id: int, eos_id: int) -> Step:
    """Abstract init, sharded plan, loss config, abstract batch and the jitted step: nothing is materialised."""
    from dual_diffusion.training.loss import LossConfig
    from dual_diffusion.training.state import make_plan
    from dual_diffusion.training.step import make_train_step

    plan = make_plan(config, mesh, rules, mask_id)
    spike_factor = float(config.train.get("loss_spike_factor", 0.0))
    if spike_factor > 0:
        plan = with_loss_window(plan, int(config.train.loss_spike_window))
    loss_cfg = LossConfig.from_config(config.loss, mask_id=mask_id, null_id=eos_id)
    batch = abstract_batch(config, mesh, rules)
    batch_shardings = jax.tree.map(lambda a: a.sharding, batch)
    vae = config.model.vae
    step = make_train_step(plan, loss_cfg, batch_shardings, microbatches=config.train.microbatches,
                           ema_decay=float(config.ema.decay), latent_shift=vae.shift_factor,
                           latent_scale=vae.scaling_factor, loss_spike_factor=spike_factor)
    return Step(plan, loss_cfg, batch, batch_shardings, step, spike_factor)


# --------------------------------------------------------------------------- batches
def batch_shape(config) -> tuple[int, int]:
    """(image_size in pixels, text length) of the training batches."""
    return int(config.data.image_size), int(config.data.text_length)


def abstract_batch(config, mesh, rules) -> dict:
    """ShapeDtypeStructs (with shardings) of one global batch, as the data pipeline yields it."""
    B = config.train.batch_size
    px, L = batch_shape(config)
    sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, rules,
                                                                                                 len(shape)))
    return {"t2i": {"image": sd((B, px, px, 3), jnp.float32), "text_ids": sd((B, L), jnp.int32)},
            "i2t": {"image": sd((B, px, px, 3), jnp.float32), "text_ids": sd((B, L), jnp.int32),
                    "label_mask": sd((B, L), jnp.bool_), "fixed_mask": sd((B, L), jnp.bool_)}}


def global_batch(local: dict, shardings: dict) -> dict:
    """Per-process numpy batch -> global jax.Arrays (the pipeline's `stats` stay on the host)."""
    return jax.tree.map(lambda sh, x: jax.make_array_from_process_local_data(sh, np.asarray(x)),
                        shardings, {k: local[k] for k in shardings})


def make_data_iterator(config, tokenizer):
    from dual_diffusion.data.pipeline import make_dual_iterator

    return make_dual_iterator(config.data, tokenizer, global_batch_size=config.train.batch_size,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              seed=config.seed)


# --------------------------------------------------------------------------- state
def with_loss_window(plan: Plan, window: int) -> Plan:
    """The plan with `loss_window` (float32 (window,), NaN = empty, replicated) in the train state:
    the loss-spike guard's memory (step.train_step). Only runs with the guard carry it, so
    checkpoints of runs without it keep their layout."""
    replicated = jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec())
    empty = lambda: jnp.full((window,), jnp.nan, jnp.float32)
    base_init, base_fresh = plan.init_fn, plan.fresh_state

    def init_fn():
        state, frozen = base_init()
        return dict(state, loss_window=jax.device_put(empty(), replicated)), frozen

    return dataclasses.replace(
        plan, init_fn=init_fn, fresh_state=lambda params: dict(base_fresh(params), loss_window=empty()),
        abstract_state=dict(plan.abstract_state, loss_window=jax.ShapeDtypeStruct((window,), jnp.float32,
                                                                                  sharding=replicated)),
        state_shardings=dict(plan.state_shardings, loss_window=replicated))


def initial_state(plan: Plan, bundle) -> tuple[dict, dict]:
    """From scratch (plan.init_fn) or from a converted checkpoint (weights already sharded by load_pretrained)."""
    if bundle is None:
        return plan.init_fn()
    params, frozen = plan.split.cut({name: bundle.states[name] for name in plan.split.graphdefs})
    frozen = jax.device_put(frozen, plan.frozen_shardings)
    init_rest = jax.jit(plan.fresh_state, out_shardings=plan.state_shardings)
    return init_rest(jax.device_put(params, plan.state_shardings["params"])), frozen


def frozen_for_resume(plan: Plan, bundle, workdir) -> dict:
    if bundle is not None:
        _, frozen = plan.split.cut({name: bundle.states[name] for name in plan.split.graphdefs})
        return jax.device_put(frozen, plan.frozen_shardings)
    frozen = checkpointing.restore_frozen(workdir, plan.abstract_frozen)
    if frozen is None:  # killed before the first save: scratch init is deterministic, make it again
        logging.warning("no %s/frozen; re-creating the frozen weights from the seed", workdir)
        _, frozen = plan.init_fn()
    return frozen


def model_json(config, plan: Plan, tokenizer) -> dict:
    out = {name: cfg for name, cfg in plan.arch.items()}
    out.update(latent_space=config.model.latent_space, mask_id=plan.mask_id,
               runtime=plan.runtime.to_dict(), init_from=config.init_from,
               tokenizer=str(getattr(tokenizer, "model_file", "") or config.tokenizer.model_file or ""),
               latent_shift=config.model.vae.shift_factor, latent_scale=config.model.vae.scaling_factor)
    return out


# --------------------------------------------------------------------------- dry run
def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a sharded abstract pytree (largest shard over devices)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return int(total)


def dry_run_report(plan: Plan, train_step, abstract_batch_, mesh, compile_step: bool = False) -> dict:
    """Parameter counts and bytes per device of params / frozen / optimizer / EMA.

    Bytes come from the sharded abstract shapes ("memory_source": "shapes"); with
    compile_step the step is also compiled on abstract inputs and XLA's memory
    analysis is added ("memory_source": "compiled").
    """
    counts = {"transformer": plan.param_counts.get("transformer", 0),
              "text_encoder": plan.param_counts.get("text_encoder", 0),
              "vae": plan.param_counts.get("vae", 0)}
    st = plan.abstract_state
    report = {
        "params": counts,
        "mesh": dict(mesh.shape),
        "bytes_per_device": {
            "params": _bytes_per_device(st["params"]),
            "frozen": _bytes_per_device(plan.abstract_frozen),
            "optimizer": _bytes_per_device(st["opt_state"]),
            "ema": _bytes_per_device(st["ema"]) if st["ema"] is not None else 0,
        },
        "memory_source": "shapes",
    }
    if compile_step:
        compiled = train_step.lower(st, plan.abstract_frozen, abstract_batch_).compile()
        mem = compiled.memory_analysis()
        report["compiled"] = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                                 "temp_size_in_bytes") if hasattr(mem, k)}
        report["memory_source"] = "compiled"
    return report


def describe(plan: Plan, mesh, config) -> str:
    slices = len({sharding.slice_index(d) for d in mesh.devices.flat})
    lines = [f"mesh: {dict(mesh.shape)} over {mesh.devices.size} devices"
             + (f" in {slices} slices (data across them)" if slices > 1 else ""),
             f"batch: {config.train.batch_size} per half x {config.train.microbatches} microbatch(es)"]
    lines.append("rules: " + ", ".join(f"{name}->{axes}" for name, axes in config.sharding.rules))
    for name, n in plan.param_counts.items():
        trains = "trains" if name == "transformer" else (
            f"frozen (trainable: {config.model.text_encoder_trainable})" if name == "text_encoder" else "frozen")
        lines.append(f"{name}: {n:,} parameters, {trains}")
    lines.append(f"frozen weights: kernels and T5's table in {plan.split.frozen_dtype or plan.runtime.param_dtype}, "
                 f"sharding.frozen_rules={plan.frozen_placement}; kernels are gathered in {plan.runtime.dtype}")
    lines.append(f"runtime: {plan.runtime.to_dict()}")
    return "\n".join(lines)
