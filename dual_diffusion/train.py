r"""Trains D-DiT: one jitted step for the image and text losses, sharded, checkpointed.

  python -m dual_diffusion.train --config=configs/stage2.py --workdir=DIR [--config.train.batch_size=512]
  python -m dual_diffusion.train --config=configs/stage2.py --workdir=DIR --dry_run

The same command runs on every host of a pod (launch/README.md). A workdir
holding checkpoints is resumed from its latest step that restores (a damaged one
is moved aside); SIGTERM (preemption) saves and exits 0. One run per workdir: a
lease (training/lease.py) refuses a second one. A usage or config error is one
line `error: ...` on stderr with exit status 2; a run stopped by non-finite
losses exits 1 with one line; --verbose (or DD_VERBOSE=1) shows tracebacks and
the absl/Orbax INFO logs. Sections: mesh, input, model, optimizer, shard, step,
checkpoint, evals, loop.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here (local path or gs://).")
flags.DEFINE_bool("dry_run", False, "Build everything abstractly, print the plan and sizes, and exit.")
flags.DEFINE_bool("force_takeover", False, "Take the workdir lease even from a run that looks alive (its "
                  "host is unreachable, or it is known to be dead).")
flags.DEFINE_bool("verbose", False, "Tracebacks for errors and the absl/Orbax INFO logs (also DD_VERBOSE=1).")
flags.DEFINE_bool("dry_run_compile", False, "With --dry_run: also compile the step on abstract inputs and report "
                  "XLA's memory analysis (slow for the full model on CPU).")
flags.DEFINE_string("topology", None, "With --dry_run: compile the step for this Cloud TPU slice (v5p-64, v4-16, "
                    "v5e-8, v6e-8, ...) from any host with libtpu (pip install -e \".[tpu]\") and report whether it fits.")
flags.DEFINE_bool("find_max_batch", False, "With --topology: bisect the largest global batch per half that fits.")


class _StopFlag:
    """Set by SIGTERM; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        logging.warning("signal %d received: checkpointing and exiting after this step", signum)
        self.requested = True


class TrainingStopped(Exception):
    """The run stopped itself (too many skipped updates): one line, exit status 1."""


_LEASES = []  # the workdir lease this process holds, released when main returns or fails


def _verbose(argv=None) -> bool:
    if os.environ.get("DD_VERBOSE", "") not in ("", "0"):
        return True
    if argv is not None:
        return "--verbose" in argv or "--verbose=true" in argv
    return FLAGS.is_parsed() and FLAGS.verbose


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _parse_flags(argv):
    """absl parsing with one-line errors (an unknown --config.<key>, a missing --config file, ...)."""
    from dual_diffusion.training.config_check import config_file_error, explain_flag_error

    try:
        args = FLAGS(argv)
    except Exception as e:  # noqa: BLE001  (every parse failure is a usage error)
        if _verbose(argv):
            raise
        _fail(explain_flag_error(argv[1:], e))
    missing = config_file_error(argv[1:])
    if missing:
        _fail(missing)
    return args


def cli(argv=None) -> None:
    """The command: `python -m dual_diffusion.train ...` (argv: sys.argv, program name first)."""
    app.run(run, argv=argv, flags_parser=_parse_flags)


def _quiet_logs() -> None:
    """absl/Orbax INFO lines off unless --verbose or an explicit --verbosity; the run's own lines stay."""
    if FLAGS.verbose or FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)


def _take_lease(workdir, jax):
    """Process 0 takes the workdir lease for the run; every process learns whether it did."""
    from dual_diffusion.training.lease import Lease, LeaseHeld

    lease, error = None, None
    if jax.process_index() == 0:
        try:
            lease = Lease(workdir).acquire(force=FLAGS.force_takeover)
        except LeaseHeld as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))) and error is None:
            error = LeaseHeld(f"--workdir={workdir}: process 0 could not take the workdir lease (its log says why)")
    if error is not None:
        raise error
    if lease is not None:
        _LEASES.append(lease)
    return lease


def run(argv):
    """main() with one-line errors: usage/config/workdir errors exit 2, a self-stopped run exits 1."""
    from dual_diffusion.cli import UsageError
    from dual_diffusion.training.config_check import ConfigError

    try:
        main(argv)
    except (UsageError, TrainingStopped) as e:
        if _verbose():
            raise
        message = f"invalid config: {e.one_line()}" if isinstance(e, ConfigError) else " ".join(str(e).split())
        _fail(message, 1 if isinstance(e, TrainingStopped) else 2)
    finally:
        while _LEASES:
            _LEASES.pop().release()


def main(argv):
    del argv
    import jax

    from dual_diffusion import distributed, sharding
    from dual_diffusion.cli import UsageError
    from dual_diffusion.training import checkpointing, config_check, plan_io
    from dual_diffusion.training.metrics import MetricsWriter, Throughput, console, progress_line

    stop = _StopFlag()  # installed first: a preemption during startup must not kill a save
    signal.signal(signal.SIGTERM, stop)
    config = FLAGS.config
    if config is None:
        raise UsageError("--config is required (--config=configs/<name>.py[:variant])")
    if FLAGS.topology or FLAGS.find_max_batch:  # compile for a TPU slice from this host: aot/compile_report.py
        from dual_diffusion.aot import compile_report
        _quiet_logs()
        sys.exit(compile_report.main(config, FLAGS.topology, dry_run=FLAGS.dry_run, find_max=FLAGS.find_max_batch))
    if not FLAGS.dry_run and not FLAGS.workdir:
        raise UsageError("--workdir is required (unless --dry_run)")
    _quiet_logs()
    distributed.initialize_from_env()

    # ---- mesh (every config error, data sources included, is found before the workdir is touched)
    config_check.check_config(config, jax.device_count(), dry_run=FLAGS.dry_run, num_slices=sharding.num_slices())
    workdir = None if FLAGS.dry_run else checkpointing.check_workdir(FLAGS.workdir)
    lease = None if FLAGS.dry_run else _take_lease(workdir, jax)
    guard = lease.ensure_held if lease is not None else (lambda: None)  # only the holder writes
    mesh = sharding.mesh_from_config(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    logging.info("mesh %s on %d devices / %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

    # ---- input (tokenizer first: it fixes the vocabulary)
    tokenizer = plan_io.get_tokenizer(config, workdir, dry_run=FLAGS.dry_run)
    bundle = None
    if config.init_from and not FLAGS.dry_run:
        from dual_diffusion.checkpoints.pretrained import load_pretrained
        try:
            bundle = load_pretrained(config.init_from, runtime=plan_io.runtime_of(config), mesh=mesh, rules=rules,
                                     components=plan_io.components_of(config))
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise UsageError(f"cannot load config.init_from={config.init_from}: {e}") from e
        tokenizer = bundle.tokenizer
    plan_io.resolve_vocab(config, tokenizer, bundle, dry_run=FLAGS.dry_run)
    mask_id, eos_id = plan_io.special_ids(config, tokenizer)

    # ---- model, optimizer, shard, step (abstract init; nothing is materialised yet)
    built = plan_io.build_step(config, mesh, rules, mask_id, eos_id)
    plan, loss_cfg, abstract_batch, batch_shardings = built.plan, built.loss_cfg, built.abstract_batch, \
        built.batch_shardings
    train_step, spike_factor = built.train_step, built.spike_factor
    if FLAGS.dry_run:
        report = plan_io.dry_run_report(plan, train_step, abstract_batch, mesh, compile_step=FLAGS.dry_run_compile)
        print(plan_io.describe(plan, mesh, config))
        print(json.dumps(report))
        return

    # ---- checkpoint (resume from the latest complete step, or initialise)
    data_iter = plan_io.make_data_iterator(config, tokenizer)
    checkpointing.write_workdir_json(workdir, config, plan_io.model_json(config, plan, tokenizer))
    ckpt = checkpointing.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    latest, state = ckpt.restore_latest(plan.abstract_state, data_iter)
    if latest is None:
        state, frozen = plan_io.initial_state(plan, bundle)
        if bundle is None:
            checkpointing.save_frozen(workdir, frozen)
        console(f"starting from scratch{f' (init_from={config.init_from})' if bundle else ''} in {workdir}")
    else:
        frozen = plan_io.frozen_for_resume(plan, bundle, workdir)
        console(f"resumed from step {latest} in {ckpt.directory}")
    start = int(jax.device_get(state["step"]))

    # ---- evals (periodic samples for fixed prompts / images)
    from dual_diffusion.training import samples
    sampler = samples.Sampler(config, plan, tokenizer, workdir, loss_cfg)

    # ---- loop
    writer = MetricsWriter(workdir, resume_step=start)
    meter = Throughput(start)
    total, max_bad = int(config.train.num_steps), int(config.train.max_consecutive_nonfinite)
    samples_per_step = 2 * config.train.batch_size
    consecutive_bad, settled, step = 0, start, start
    pending = None  # (step, metrics on device): read one step late so the host never waits on the device

    def settle(pending_step, metrics):
        nonlocal consecutive_bad, settled
        scalars = jax.device_get(metrics)
        finite, spike = bool(scalars.pop("finite")), bool(scalars.pop("spike", False))
        consecutive_bad = 0 if finite and not spike else consecutive_bad + 1
        settled = pending_step
        if not finite or spike:
            why = (f"loss {float(scalars['loss']):.4g} above {spike_factor:g} x the median of the last "
                   f"{config.train.loss_spike_window} losses" if finite else "non-finite loss or gradient")
            console(f"warning: step {pending_step}: {why}; update skipped ({consecutive_bad} in a row)")
        if pending_step % config.train.log_every == 0 or pending_step == total:
            rate = meter.rate(pending_step, samples_per_step)
            if rate is not None:
                scalars["samples_per_sec"] = rate
            guard()
            console(progress_line(writer.write(pending_step, scalars), total, samples_per_step))

    while step < total:
        batch = plan_io.global_batch(next(data_iter), batch_shardings)
        if step == start:
            console(f"compiling the train step (batch {config.train.batch_size} per half)...")
            compile_t0 = time.perf_counter()
            train_step = train_step.lower(state, frozen, batch).compile()
            distributed.barrier("dual_diffusion:step_compiled")  # hosts compile at their own pace
        state, metrics = train_step(state, frozen, batch)
        step += 1
        if step == start + 1:  # the first call compiles; later intervals exclude it
            jax.block_until_ready(metrics)
            console(f"compiled the train step and ran step {step} in {time.perf_counter() - compile_t0:.1f}s")
            meter.restart(step)
        if pending is not None:
            settle(*pending)
        pending = (step, metrics)
        if consecutive_bad >= max_bad:
            break  # `state` already holds one more step: it is not saved
        save_due = step % config.checkpoint.every_steps == 0 or step == total
        preempted = jax.process_count() > 1 and ckpt.reached_preemption(step)
        if save_due or stop.requested or preempted:
            settle(*pending)  # a saved step's metrics row is written before its checkpoint
            pending = None
            if consecutive_bad >= max_bad:
                break
            guard()
            ckpt.save(step, state, data_iter)
            console(f"checkpoint step {step} {'saving in the background' if ckpt.async_save else 'saved'} "
                    f"to {ckpt.directory}")
        if config.samples.every_steps and step % config.samples.every_steps == 0:
            guard()
            sampler.write(step, state, frozen)
        if stop.requested or preempted:
            ckpt.close()
            writer.close()
            console(f"stopped at step {step} by SIGTERM/preemption; checkpoint saved")
            sys.exit(0)
    if consecutive_bad >= max_bad:
        ckpt.close()
        writer.close()
        last = ckpt.latest_step()
        good = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
                else "no checkpoint was saved before")
        raise TrainingStopped(
            f"stopped at step {settled}: {consecutive_bad} consecutive updates skipped (non-finite loss or "
            f"gradient{', or loss spikes' if spike_factor > 0 else ''}; train.max_consecutive_nonfinite={max_bad}); "
            f"this state is not saved, {good}. Lower optimizer.lr or check the data.")
    ckpt.close()
    writer.close()
    if config.eval.shapes_suite:
        console(f"final evaluation: shapes suite, {config.eval.shapes_suite_size} items per task...")
        scores = sampler.shapes_suite(state, frozen)
        print(json.dumps({"step": step, "shapes_suite": scores}))


if __name__ == "__main__":
    cli()
