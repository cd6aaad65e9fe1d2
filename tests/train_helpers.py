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
