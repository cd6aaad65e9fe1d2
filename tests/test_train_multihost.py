"""train.py's multi-host path, run as 2 CPU processes x 4 devices of one gloo cluster (tests/multihost.py).

Each process reads its own share of the data and the global batch is assembled from the per-process batches;
Orbax writes from every process, the lease and the samples belong to process 0, and a run stopped after a
checkpoint and started again ends with the metrics of a straight run. T5 trains its mask row only (stage 2's
layout), and the workdir's reader folds it back into the table.
"""
import json
import shutil
from pathlib import Path

import pytest
from multihost import ROOT, describe, run_processes

TINY = ["-m", "dual_diffusion.train", "--config=configs/demo.py", "--config.train.batch_size=8",
        "--config.train.log_every=1", "--config.checkpoint.every_steps=2", "--config.eval.shapes_suite=False",
        "--config.model.transformer.num_layers=1", "--config.model.text_encoder.num_layers=1",
        "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=2", "--config.data.text_length=24",
        "--config.tokenizer.train_vocab_size=300", "--config.model.text_encoder_trainable=mask_row"]
SAMPLES = ["--config.samples.image_steps=2", "--config.samples.text_steps=2", "--config.samples.num_caption_images=2"]

# Each process prints its own data share and the global batch it fed (first step), read back by the data test.
_DATA_PROBE = r"""
import json, sys
import jax, numpy as np
from jax.experimental import multihost_utils
from dual_diffusion import distributed, sharding
from dual_diffusion.training import plan_io
from dual_diffusion.tokenizer import Tokenizer
from configs import demo

distributed.initialize_from_env()
config = demo.get_config()
config.train.batch_size, config.data.text_length = 8, 24
mesh = sharding.mesh_from_config(config.mesh)
shardings = jax.tree.map(lambda a: a.sharding, plan_io.abstract_batch(config, mesh, sharding.DEFAULT_RULES))
it = plan_io.make_data_iterator(config, Tokenizer(sys.argv[1]))
local = next(it)
full = multihost_utils.process_allgather(plan_io.global_batch(local, shardings)["i2t"]["text_ids"], tiled=True)
print(json.dumps({"local": np.asarray(local["i2t"]["text_ids"]).tolist(), "global": np.asarray(full).tolist(),
                  "devices": [jax.local_device_count(), jax.device_count()]}))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One persistent compilation cache for every run of the module (the same steps compile once)."""
    path = tmp_path_factory.mktemp("jax_cache")
    return {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _train(workdir, *extra, env=None):
    results = run_processes([*TINY, f"--workdir={workdir}", *extra], env=env, timeout=900)
    assert all(r.returncode == 0 for r in results), describe(results)
    return results


def _metrics(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "samples_per_sec"} for r in rows]


def test_each_process_feeds_its_own_share_of_the_global_batch(tmp_path):
    from dual_diffusion.data.shapes import shapes_captions_corpus
    from dual_diffusion.tokenizer import train_sentencepiece

    model = train_sentencepiece(shapes_captions_corpus(0, 300), tmp_path / "sp", 300)
    results = run_processes(["-c", _DATA_PROBE, str(model)], timeout=300)
    assert all(r.returncode == 0 for r in results), describe(results)
    out = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    assert [o["devices"] for o in out] == [[4, 8], [4, 8]]
    local0, local1 = out[0]["local"], out[1]["local"]
    assert len(local0) == len(local1) == 4 and local0 != local1  # 4 rows each: disjoint shares of 8
    assert out[0]["global"] == out[1]["global"] == local0 + local1  # process 0's rows first, as its devices


@pytest.mark.slow
def test_two_processes_train_save_and_resume_exactly(tmp_path, cache):
    workdir = tmp_path / "run"
    results = _train(workdir, "--config.train.num_steps=4", "--config.samples.every_steps=4", *SAMPLES, env=cache)
    # Process 0 speaks for the run: progress, checkpoints and samples; process 1 stays silent.
    assert "checkpoint step 4" in results[0].stderr and "samples for step 4" in results[0].stderr
    assert "checkpoint" not in results[1].stderr and "samples" not in results[1].stderr
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == ["step_4_captions.json", "step_4_images.png"]
    assert not (workdir / "lease.json").exists()  # process 0 took it and gave it back
    # Orbax wrote from both processes: each one's array shards and data-iterator position.
    step = workdir / "checkpoints" / "4"
    assert {p.name for p in (step / "data").iterdir()} >= {"process_0-of-2.json", "process_1-of-2.json"}
    assert {p.name for p in (step / "state").iterdir()} >= {"ocdbt.process_0", "ocdbt.process_1"}
    straight = _metrics(workdir)
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    # Readers of the workdir see T5's trained mask row (EMA) folded back into its frozen table.
    import numpy as np
    import orbax.checkpoint as ocp

    from dual_diffusion.checkpoints.pretrained import load_pretrained, restore_here

    mask_id = json.loads((workdir / "model.json").read_text())["mask_id"]
    table = np.asarray(load_pretrained(workdir, components=("text_encoder",)).states["text_encoder"]["embedding"][...])
    with ocp.StandardCheckpointer() as ckptr:  # written by 2 processes, read by this one
        row = restore_here(ckptr, step / "state")["ema"]["text_encoder"]["mask_row"]
        frozen = restore_here(ckptr, workdir / "frozen")["text_encoder"]["embedding"]
    np.testing.assert_array_equal(table[mask_id], np.asarray(row)[0])
    np.testing.assert_array_equal(np.delete(table, mask_id, 0), np.delete(np.asarray(frozen), mask_id, 0))

    # Stopped after step 2's checkpoint: the rerun resumes there and ends with the straight run's metrics.
    shutil.rmtree(step)
    results = _train(workdir, "--config.train.num_steps=4", "--config.samples.every_steps=0", env=cache)
    assert "resumed from step 2" in results[0].stderr
    assert _metrics(workdir) == straight
