"""Orbax checkpoints of a training workdir, resume, and the workdir's model description.

Workdir layout (what `load_pretrained(WORKDIR)` and a resumed run read):
  WORKDIR/config.json          the full training config (ml_collections -> JSON)
  WORKDIR/model.json           architectures {transformer, text_encoder, vae?}, latent_space,
                               mask_id, tokenizer model file, init_from
  WORKDIR/checkpoints/<step>/  Orbax: `state` (step, params, opt_state, ema, rng, nonfinite)
                               and `data` (the grain iterator's position)
  WORKDIR/frozen/              frozen weights (T5 minus its trained part, VAE, buffers), written once
                               when training from scratch; with init_from they come from that folder
Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves no step that `latest_step` would pick up. A
complete step that fails to restore (a damaged file) is moved aside to
checkpoints/<step>.damaged once an older step restores (`restore_latest`).

A workdir is local or a URL (gs://bucket/run): every path of it is an etils.epath.Path
(`checkpoints.paths.workdir_path`), which Orbax, TensorStore and the lease take as they are. gs:// needs
`gcsfs` installed (epath's backend for it); Orbax writes the arrays through TensorStore's
own GCS driver. On object stores Orbax marks a complete step with a commit file instead of
a rename, with the same guarantee.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dual_diffusion.checkpoints.paths import atomic_write, is_local, workdir_path
from dual_diffusion.cli import UsageError

DAMAGED_SUFFIX = ".damaged"


class CheckpointError(UsageError):
    """No checkpoint of the workdir restores, or the workdir itself is unusable (reported as one line)."""


def _grain_args(data_iter, restore: bool):
    import grain
    return grain.checkpoint.CheckpointRestore(data_iter) if restore else grain.checkpoint.CheckpointSave(data_iter)


def _drop_none(state: dict) -> dict:
    return {k: v for k, v in state.items() if v is not None}


class Checkpointer:
    """CheckpointManager over WORKDIR/checkpoints: keep the last `keep`, optional async saves."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = workdir_path(workdir) / "checkpoints"
        self.async_save = async_save
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        import grain
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iter=None, *, force: bool = True) -> bool:
        """Saves `step` (asynchronously when enabled); a step already saved is left as it is."""
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(_drop_none(state))}
        if data_iter is not None:
            items["data"] = _grain_args(data_iter, restore=False)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict, data_iter=None) -> dict:
        """The state at `step`, laid out and sharded like `abstract_state`; restores `data_iter` in place.

        Any failure is raised with the step and folder named: never a silent fresh start.
        """
        items = {"state": ocp.args.StandardRestore(_drop_none(abstract_state))}
        if data_iter is not None:
            items["data"] = _grain_args(data_iter, restore=True)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # re-raised with context; training must not continue from scratch
            raise RuntimeError(f"checkpoint restore failed for step {step} in {self.directory}: "
                               f"{type(e).__name__}: {e}") from e
        state = dict(restored["state"])
        for k, v in abstract_state.items():
            state.setdefault(k, None if v is None else state.get(k))
        return state

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: dict, data_iter=None) -> tuple[int, dict] | tuple[None, None]:
        """(step, state) of the newest step that restores; (None, None) when there is no step.

        Steps that fail while an older one restores are moved aside to <step>.damaged (with a
        warning); when none restores nothing is moved (the cause may be the config, not the
        files) and CheckpointError names every step and the newest one's error.
        """
        steps = self.all_steps()
        if not steps:
            return None, None
        failed: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                state = self.restore(step, abstract_state, data_iter)
            except RuntimeError as e:
                failed.append((step, str(e).splitlines()[0] if str(e) else type(e).__name__))
                logging.warning("%s", failed[-1][1])
                continue
            for bad, _ in failed:
                self._move_aside(bad)
            if failed:
                self.manager.reload()
            return step, state
        if self._holds_t5_table(steps[-1], abstract_state):
            raise CheckpointError(
                f"checkpoint step {steps[-1]} in {self.directory} trains T5's whole embedding table "
                "(params.text_encoder.embedding, the layout before the mask row became a (1, d_model) parameter "
                "of its own, params.text_encoder.mask_row): resume it with the code that wrote it, or start a new "
                "workdir (sample, evaluate and load_pretrained still read it)")
        newest = failed[0][1]
        raise CheckpointError(f"no checkpoint in {self.directory} restores (steps {[s for s, _ in failed]}); "
                              f"newest: {newest[:400]}")

    def _holds_t5_table(self, step: int, abstract_state: dict) -> bool:
        """Whether `step` trains T5's full table where `abstract_state` trains only its mask row."""
        if "mask_row" not in (abstract_state.get("params") or {}).get("text_encoder", {}):
            return False
        try:
            with ocp.StandardCheckpointer() as ckptr:
                tree = ckptr.metadata(self.directory / str(step) / "state").item_metadata.tree
        except Exception:  # noqa: BLE001  (unreadable metadata: the generic error says why)
            return False
        return "embedding" in tree.get("params", {}).get("text_encoder", {})

    def _move_aside(self, step: int) -> None:
        src = self.directory / str(step)
        dst = self.directory / f"{step}{DAMAGED_SUFFIX}"
        k = 1
        while dst.exists():  # an earlier damaged copy of the same step
            dst, k = self.directory / f"{step}{DAMAGED_SUFFIX}.{k}", k + 1
        if jax.process_index() == 0:
            src.rename(dst)
        logging.warning("checkpoint step %d in %s does not restore: moved aside to %s", step, self.directory, dst)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True on every host once one host was told it will be preempted (multi-host sync point)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --------------------------------------------------------------------------- frozen weights
def save_frozen(workdir: str | os.PathLike, frozen: dict) -> None:
    """WORKDIR/frozen, once; every process calls it (Orbax writes each process's shards)."""
    path = workdir_path(workdir) / "frozen"
    exists = path.exists()
    from dual_diffusion import distributed
    distributed.barrier("dual_diffusion:frozen_checked")  # all decide before any of them writes the folder
    if exists:
        return
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, frozen)


def restore_frozen(workdir: str | os.PathLike, abstract_frozen: dict) -> dict | None:
    path = workdir_path(workdir) / "frozen"
    if not path.exists():
        return None
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path, abstract_frozen)
        except Exception as e:
            raise RuntimeError(f"restoring frozen weights from {path} failed: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- workdir description
def check_workdir(workdir: str | os.PathLike) -> epath.Path:
    """Creates WORKDIR if needed; a path that exists and is not a directory is an error (one line).

    Returns the workdir as `workdir_path` gives it. On an object store (gs://) the local checks (a parent
    that is a file, write permission) have no meaning and are skipped; a store that cannot be reached (no
    gcsfs, no credentials, no bucket) is one line too.
    """
    path = workdir_path(workdir)
    if not is_local(path):
        try:
            if path.exists() and not path.is_dir():
                raise WorkdirError(f"--workdir={workdir}: exists and is not a directory")
            path.mkdir(parents=True, exist_ok=True)
        except ImportError as e:
            raise WorkdirError(f"--workdir={workdir}: this kind of path needs gcsfs (pip install gcsfs): "
                               f"{e}") from None
        except WorkdirError:
            raise
        except Exception as e:  # noqa: BLE001  (auth, network, missing bucket: reported as one line)
            raise WorkdirError(f"--workdir={workdir}: cannot reach or create it ({type(e).__name__}: {e})") from None
        return path
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir={workdir}: exists and is not a directory")
    for parent in Path(path).parents:  # mkdir would fail with a bare [Errno 20]
        if parent.exists():
            if not parent.is_dir():
                raise WorkdirError(f"--workdir={workdir}: {parent} is a file, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir}: cannot create it ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise WorkdirError(f"--workdir={workdir}: not writable")
    return path


class WorkdirError(CheckpointError):
    """A --workdir that cannot hold a run (a file, not creatable, not writable)."""


def write_workdir_json(workdir: str | os.PathLike, config, model_json: dict[str, Any]) -> None:
    """Writes config.json and model.json (process 0 only); compares them with an existing run's."""
    if jax.process_index() != 0:
        return
    path = workdir_path(workdir)
    model_file = path / "model.json"
    model_json = json.loads(json.dumps(model_json))  # tuples -> lists, as the file holds them
    if model_file.exists():
        old = json.loads(model_file.read_text())
        for name in ("transformer", "text_encoder", "vae", "latent_space"):
            if old.get(name) != model_json.get(name):
                raise CheckpointError(f"--workdir={workdir} holds a run with a different model.{name} "
                                 f"({old.get(name)} != {model_json.get(name)}); use a new workdir")
    atomic_write(model_file, json.dumps(model_json, indent=2, sort_keys=True))
    atomic_write(path / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))
    logging.info("wrote %s and config.json", model_file)
