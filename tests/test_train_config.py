"""Training configs: stage files build, bad keys / values / paths fail before any compile, naming the key."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dual_diffusion  # noqa: F401
from dual_diffusion.training import checkpointing
from dual_diffusion.training.config_check import ConfigError, check_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo, stage1, stage2, stage3  # noqa: E402


@pytest.mark.parametrize("module", [stage1, stage2, stage3, demo])
def test_stage_configs_are_valid_and_locked(module):
    c = module.get_config()
    check_config(c, num_devices=8, dry_run=True)
    with pytest.raises(AttributeError, match="batchsize"):
        c.train.batchsize = 3  # a typo is an error, not a new key
    for key in ("train.num_steps", "train.log_every", "checkpoint.every_steps", "mesh.data", "mesh.fsdp",
                "mesh.tensor"):
        node = c
        for part in key.split("."):
            node = node[part]
        assert isinstance(node, int), key
    assert "init_from" in c


def test_demo_gpu_and_full_variants_are_valid():
    from dual_diffusion.data.shapes import FULL_WORLD, world_of_run

    c = demo.get_config("gpu")
    check_config(c, num_devices=8, dry_run=True)
    assert c.model.transformer.num_layers == 8 and c.runtime.dtype == "bfloat16"
    full = demo.get_config("full")
    check_config(full, num_devices=8, dry_run=True)
    assert world_of_run(c) == world_of_run(full) == FULL_WORLD != world_of_run(demo.get_config())
    with pytest.raises(ValueError, match="unknown config variant 'tpu'"):
        demo.get_config("tpu")


def _errors(**changes):
    c = demo.get_config()
    with c.unlocked():
        for key, value in changes.items():
            node = c
            *parents, leaf = key.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
    with pytest.raises(ConfigError) as e:
        check_config(c, num_devices=8)
    return str(e.value)


def test_bad_values_name_their_key():
    assert "config.optimizer.lr=-1.0" in _errors(optimizer__lr=-1.0)
    assert "config.runtime.dtype='fp17'" in _errors(runtime__dtype="fp17")
    assert "config.ema.decay=1.5" in _errors(ema__decay=1.5)
    assert "config.loss.text_normalization='per_token'" in _errors(loss__text_normalization="per_token")
    assert "config.loss.latent_sampling='mode'" in _errors(loss__latent_sampling="mode")
    assert "config.data.shapes_world: colors=('red', 'mauve')" in _errors(
        data__shapes_world__colors=("red", "mauve"))
    assert "config.runtime.remat_policy='offload'" in _errors(runtime__remat_policy="offload")
    msg = _errors(mesh__data=3, mesh__fsdp=-1)
    assert "config.mesh" in msg and "8 devices" in msg
    assert "config.train.microbatches=3" in _errors(train__microbatches=3)
    assert "joint_attention_dim" in _errors(model__transformer__joint_attention_dim=48)
    length = demo.get_config().data.text_length
    assert f"text_pos_embed_len=16 is shorter than config.data.text_length={length}" in _errors(
        model__transformer__text_pos_embed_len=16)


def test_missing_init_from_is_an_error():
    assert "config.init_from='/nonexistent/ckpt'" in _errors(init_from="/nonexistent/ckpt")


def test_workdir_that_is_a_file_is_an_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(checkpointing.WorkdirError, match="--workdir"):
        checkpointing.check_workdir(f)


def _train(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "dual_diffusion.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_command_line_rejects_unknown_key_and_bad_workdir(tmp_path):
    r = _train("--config=configs/demo.py", "--workdir", str(tmp_path), "--config.train.batchsize=8")
    assert r.returncode != 0 and "batchsize" in r.stderr
    f = tmp_path / "file"
    f.write_text("x")
    r = _train("--config=configs/demo.py", f"--workdir={f}")
    assert r.returncode != 0 and "not a directory" in r.stderr


# --dry_run of every config file (stage 2's release parameter counts and bytes per device included):
# tests/test_train_cli.py.


def test_failed_restore_is_an_error_not_a_fresh_start(tmp_path):
    import jax
    import jax.numpy as jnp

    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, {"step": jnp.ones((), jnp.int32), "params": {"w": jnp.ones((4,))}})
    ckpt.wait()
    wrong = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}}
    with pytest.raises(RuntimeError, match="restore failed for step 1"):
        ckpt.restore(1, wrong)
    ckpt.close()


def test_stage_configs_follow_the_release_code():
    """T5 trains (its mask row) in stage 2 only; EMA 0.9999; posterior draws; stage 3's loss, prompts and mix."""
    from dual_diffusion.training.loss import LossConfig

    stages = {m: m.get_config() for m in (stage1, stage2, stage3)}
    assert {m.__name__: c.model.text_encoder_trainable for m, c in stages.items()} == {
        "configs.stage1": "none", "configs.stage2": "mask_row", "configs.stage3": "none"}
    for c in stages.values():
        assert c.ema.decay == 0.9999 and c.loss.latent_sampling == "sample"
        assert (c.data.min_image_side, c.data.max_aspect_ratio) == (256, 4.0)
    c3 = stage3.get_config()
    assert c3.loss.text_normalization == "batch_tokens" and c3.data.vqa_label_padding
    assert LossConfig.from_config(c3.loss, 1, 1).text_normalization == "batch_tokens"
    suffix = {s["path"].split("/")[-1]: s["suffix"] for s in c3.data.i2t_sources}
    assert suffix == {"llava_v1_5_mix665k.json": "none", "blip_laion_cc_sbu_558k.json": "none",
                      "textvqa_train.json": "short_answer", "vizwiz_train.json": "vizwiz",
                      "vqav2_train.json": "short_answer", "okvqa_train.json": "short_answer",
                      "gqa_train.json": "short_answer"}
    assert all(s["kind"] == "llava" and s["turns"] == "first" for s in c3.data.i2t_sources)
    errors = _errors_of(c3)
    assert all(f"config.data.i2t_sources[{k}].path='FILL_ME/" in errors for k in range(7))


def _errors_of(c):
    with pytest.raises(ConfigError) as e:
        check_config(c, num_devices=8)
    return str(e.value)
