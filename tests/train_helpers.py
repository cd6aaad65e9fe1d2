"""Tiny configs and batches shared by the tests/test_train_*.py files (not a test module)."""
from __future__ import annotations

import ml_collections
import numpy as np

import dual_diffusion  # noqa: F401  (NNX sharding flag)
from dual_diffusion.models.configs import MMDiTConfig, Runtime, T5Config

VOCAB, MASK_ID, EOS_ID, L, PX = 64, 63, 1, 8, 16


def tiny_model_config(vocab: int = VOCAB) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.transformer = ml_collections.ConfigDict(MMDiTConfig(
        sample_size=PX, patch_size=4, in_channels=3, out_channels=3, num_layers=2, num_attention_heads=2,
        attention_head_dim=16, joint_attention_dim=32, pos_embed_max_size=8, vocab_size=vocab,
        num_null_image_tokens=2).to_dict())
    c.model.text_encoder = ml_collections.ConfigDict(T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4).to_dict())
    c.model.latent_space = "pixels"
    c.model.text_encoder_trainable = "mask_row"
    c.runtime = ml_collections.ConfigDict(Runtime(attention_impl="xla").to_dict())
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=2, schedule="constant", decay_steps=0, end_lr_factor=0.0, weight_decay=1e-2,
        b1=0.9, b2=0.999, eps=1e-8, clip_norm=2.0))
    c.ema = ml_collections.ConfigDict(dict(decay=0.9))
    return c


def tiny_batch(batch: int, seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    ids = lambda: r.integers(3, VOCAB - 1, (batch, L)).astype(np.int32)
    img = lambda: r.uniform(-1, 1, (batch, PX, PX, 3)).astype(np.float32)
    fixed = np.zeros((batch, L), bool)
    fixed[:, :2] = True
    return {"t2i": {"image": img(), "text_ids": ids()},
            "i2t": {"image": img(), "text_ids": ids(), "label_mask": ~fixed, "fixed_mask": fixed}}


# `python -m dual_diffusion.train ARGS` for several ARGS in one subprocess: the imports are paid once,
# then each command runs in a fork (fresh flags, fresh JAX backend) through the same `train.cli`.
_FORK_DRIVER = r"""
import contextlib, importlib, json, os, sys
import jax, ml_collections  # imported once; no backend is started before the forks
from dual_diffusion import train
import configs.common
results = []
wrap = json.loads(sys.argv[2])  # [module, function, args]: a context manager around every command, or null
ctx = getattr(importlib.import_module(wrap[0]), wrap[1])(*wrap[2]) if wrap else contextlib.nullcontext()
with ctx:
    for case in json.loads(sys.argv[1]):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.dup2(w, 1)
            err = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(err, 2)
            os.environ.update(case.get("env", {}))
            code = 0
            sys.argv = ["train", *case["argv"]]  # ml_collections reads config overrides from sys.argv
            try:
                train.cli(sys.argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback; traceback.print_exc(); code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        _, status = os.waitpid(pid, 0)
        results.append({"rc": os.waitstatus_to_exitcode(status), "stdout": out,
                        "stderr": open(case["stderr"]).read()})
print("\n" + json.dumps(results))
"""


def run_train_commands(cases: list[dict], tmp_path, timeout: int = 1200, cwd=None,
                       context: tuple[str, str, list] | None = None) -> list[dict]:
    """cases: [{"argv": [...], "env": {...}?}] -> [{"rc", "stdout", "stderr"}], in order.

    context: (module in tests/, function, args): a context manager entered once around all commands
    (e.g. test_workdir_gcs.fake_gcs). cwd: the commands' working folder (default: the repository).
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cases = [dict(c, stderr=str(Path(tmp_path) / f"stderr_{k}.txt")) for k, c in enumerate(cases)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("DD_VERBOSE", None)
    proc = subprocess.run([sys.executable, "-c", _FORK_DRIVER, json.dumps(cases), json.dumps(context)],
                          cwd=root if cwd is None else cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
