r"""Trains D-DiT: one jitted step for the image and text losses, sharded, checkpointed.

  python -m dual_diffusion.train --config=configs/stage2.py --workdir=DIR [--config.train.batch_size=512]
  python -m dual_diffusion.train --config=configs/stage2.py --workdir=DIR --dry_run

The same command runs on every host of a pod (launch/README.md). A workdir
holding checkpoints is resumed from its latest step; SIGTERM (preemption)
saves and exits 0. Sections: mesh, input, model, optimizer, shard, step,
checkpoint, evals, loop.
"""
from __future__ import annotations

import json
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here (local path or gs://).")
flags.DEFINE_bool("dry_run", False, "Build everything abstractly, print the plan and sizes, and exit.")
flags.DEFINE_bool("dry_run_compile", False, "With --dry_run: also compile the step on abstract inputs and report "
                  "XLA's memory analysis (slow for the full model on CPU).")


class _StopFlag:
    """Set by SIGTERM; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        logging.warning("signal %d received: checkpointing and exiting after this step", signum)
        self.requested = True


def _maybe_initialize_distributed(jax) -> None:
    """Multi-host runs (every host runs this same command) join one JAX cluster; single host: nothing."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):  # explicit (launch/gpu_multihost.sh)
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    elif (env.get("DD_DISTRIBUTED") == "1" or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
          or int(env.get("DD_NUM_PROCESSES", "1")) > 1):
        jax.distributed.initialize()  # TPU pod / Slurm: JAX finds the cluster by itself


def main(argv):
    del argv
    import jax

    from dual_diffusion import sharding
    from dual_diffusion.training import checkpointing, config_check, plan_io
    from dual_diffusion.training.loss import LossConfig
    from dual_diffusion.training.metrics import MetricsWriter, Throughput
    from dual_diffusion.training.state import make_plan
    from dual_diffusion.training.step import make_train_step

    stop = _StopFlag()  # installed first: a preemption during startup must not kill a save
    signal.signal(signal.SIGTERM, stop)
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required")
    if not FLAGS.dry_run and not FLAGS.workdir:
        raise app.UsageError("--workdir is required (unless --dry_run)")
    _maybe_initialize_distributed(jax)

    # ---- mesh
    config_check.check_config(config, jax.device_count(), dry_run=FLAGS.dry_run)
    workdir = None if FLAGS.dry_run else checkpointing.check_workdir(FLAGS.workdir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    logging.info("mesh %s on %d devices / %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

    # ---- input (tokenizer first: it fixes the vocabulary)
    tokenizer = plan_io.get_tokenizer(config, workdir, dry_run=FLAGS.dry_run)
    bundle = None
    if config.init_from and not FLAGS.dry_run:
        from dual_diffusion.pretrained import load_pretrained
        bundle = load_pretrained(config.init_from, runtime=plan_io.runtime_of(config), mesh=mesh, rules=rules,
                                 components=plan_io.components_of(config))
        tokenizer = bundle.tokenizer
    plan_io.resolve_vocab(config, tokenizer, bundle)
    mask_id, eos_id = plan_io.special_ids(config, tokenizer)

    # ---- model, optimizer, shard (abstract init; nothing is materialised yet)
    plan = make_plan(config, mesh, rules, mask_id)
    loss_cfg = LossConfig.from_config(config.loss, mask_id=mask_id, null_id=eos_id)
    abstract_batch = plan_io.abstract_batch(config, mesh, rules)
    batch_shardings = jax.tree.map(lambda a: a.sharding, abstract_batch)

    # ---- step
    vae = config.model.vae
    train_step = make_train_step(plan, loss_cfg, batch_shardings, microbatches=config.train.microbatches,
                                 ema_decay=float(config.ema.decay), latent_shift=vae.shift_factor,
                                 latent_scale=vae.scaling_factor)
    if FLAGS.dry_run:
        report = plan_io.dry_run_report(plan, train_step, abstract_batch, mesh, compile_step=FLAGS.dry_run_compile)
        print(plan_io.describe(plan, mesh, config))
        print(json.dumps(report))
        return

    # ---- checkpoint (resume from the latest complete step, or initialise)
    data_iter = plan_io.make_data_iterator(config, tokenizer)
    checkpointing.write_workdir_json(workdir, config, plan_io.model_json(config, plan, tokenizer))
    ckpt = checkpointing.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    latest = ckpt.latest_step()
    if latest is None:
        state, frozen = plan_io.initial_state(plan, bundle)
        if bundle is None:
            checkpointing.save_frozen(workdir, frozen)
        logging.info("starting from scratch%s", f" (init_from={config.init_from})" if bundle else "")
    else:
        state = ckpt.restore(latest, plan.abstract_state, data_iter)
        frozen = plan_io.frozen_for_resume(plan, bundle, workdir)
        logging.info("resumed from step %d in %s", latest, ckpt.directory)
    start = int(jax.device_get(state["step"]))

    # ---- evals (periodic samples for fixed prompts / images)
    from dual_diffusion.training import samples
    sampler = samples.Sampler(config, plan, tokenizer, workdir, loss_cfg)

    # ---- loop
    writer = MetricsWriter(workdir, resume_step=start)
    meter = Throughput()
    samples_per_step = 2 * config.train.batch_size
    consecutive_bad, step = 0, start
    pending = None  # (step, metrics on device): read one step late so the host never waits on the device

    def settle(pending_step, metrics):
        nonlocal consecutive_bad
        finite = bool(jax.device_get(metrics["finite"]))
        consecutive_bad = 0 if finite else consecutive_bad + 1
        if not finite:
            logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)",
                            pending_step, consecutive_bad)
        if pending_step % config.train.log_every == 0 or pending_step == config.train.num_steps:
            scalars = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
            scalars["samples_per_sec"] = meter.rate(pending_step, samples_per_step)
            row = writer.write(pending_step, scalars)
            logging.info("step %d: %s", pending_step, {k: round(v, 5) for k, v in row.items() if k != "step"})

    while step < config.train.num_steps:
        batch = plan_io.global_batch(next(data_iter), batch_shardings)
        state, metrics = train_step(state, frozen, batch)
        step += 1
        if pending is not None:
            settle(*pending)
        pending = (step, metrics)
        if consecutive_bad >= config.train.max_consecutive_nonfinite:
            break
        if step % config.checkpoint.every_steps == 0 or step == config.train.num_steps:
            ckpt.save(step, state, data_iter)
        if config.samples.every_steps and step % config.samples.every_steps == 0:
            sampler.write(step, state, frozen)
        preempted = jax.process_count() > 1 and ckpt.reached_preemption(step)
        if stop.requested or preempted:
            settle(*pending)
            ckpt.save(step, state, data_iter)
            ckpt.close()
            writer.close()
            logging.warning("stopped at step %d by SIGTERM/preemption; checkpoint saved", step)
            sys.exit(0)
    if pending is not None:
        settle(*pending)
    if consecutive_bad >= config.train.max_consecutive_nonfinite:
        ckpt.save(step, state, data_iter)  # params are still the last good ones: bad updates were skipped
        ckpt.close()
        raise RuntimeError(f"stopping at step {step}: {consecutive_bad} consecutive non-finite losses "
                           f"(train.max_consecutive_nonfinite={config.train.max_consecutive_nonfinite}); the last "
                           f"good state is checkpointed in {ckpt.directory}. Lower optimizer.lr or check the data.")
    ckpt.close()
    writer.close()
    if config.eval.shapes_suite:
        scores = sampler.shapes_suite(state, frozen)
        print(json.dumps({"step": step, "shapes_suite": scores}))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
