"""Tiny PyTorch reference networks with random weights, saved as a diffusers SD3 / D-DiT folder.

Shared by the conversion and parity tests. The transformer comes from
/work/shared/bench/ref_ddit.py (`build_ddit`), found at <repo>/../shared/bench;
tests call `require_ref_ddit()` to skip cleanly when it is absent.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "bench"

TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=24)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=8, relative_attention_max_distance=16)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=True, shift_factor=0.0609, scaling_factor=1.5305, sample_size=32)
TEXTS = ["a photo of a cat sitting on a red sofa", "two dogs run across the green grass",
         "the city skyline at night with bright lights", "a bowl of fresh fruit on a wooden table",
         "an old man reading a newspaper in the park", "snow covered mountains under a blue sky"] * 4


def require_ref_ddit():
    """Imports ref_ddit from the shared bench folder, or skips the calling test."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    if not (BENCH / "ref_ddit.py").is_file():
        pytest.skip(f"PyTorch reference {BENCH / 'ref_ddit.py'} not present")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import ref_ddit

    return ref_ddit


def _perturb(module, seed: int, scale: float = 0.05) -> None:
    """Adds noise to every parameter so no zero-init or all-ones weight hides a layout error."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def make_transformer(kind: str, vocab_size: int, seed: int = 0, **options):
    """kind 'ddit' (release layout, ref_ddit.build_ddit) or 'sd3' (plain SD3Transformer2DModel)."""
    import torch

    ref = require_ref_ddit()
    cfg = dict(TINY_TRANSFORMER, **options)
    torch.manual_seed(seed)
    if kind == "ddit":
        model = ref.build_ddit(cfg, vocab_size)
    elif kind == "sd3":
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(**cfg)
    else:
        raise ValueError(f"kind={kind!r}")
    _perturb(model, seed)
    return model.eval()


def save_transformer(model, folder: Path, max_shard_size: str | None = None) -> None:
    """save_pretrained in float32 (optionally sharded with an index json)."""
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)


def make_t5(vocab_size: int, seed: int = 1):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=vocab_size, is_encoder_decoder=False, **TINY_T5))
    _perturb(model, seed)
    return model.eval()


def make_vae(seed: int = 2):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**TINY_VAE)
    _perturb(model, seed)
    return model.eval()


def make_tokenizer(folder: Path) -> Path:
    """Trains a tiny T5-style SentencePiece model into folder/spiece.model (plus a tokenizer_config.json)."""
    from dual_diffusion.tokenizer import train_sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    path = train_sentencepiece(TEXTS, folder / "spiece", vocab_size=60)
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 100, "model_max_length": 512}))
    return path


def make_diffusers_folder(root: Path, transformer: str = "ddit", seed: int = 0, shard_transformer: bool = False,
                          **transformer_options) -> dict:
    """Writes a full SD3-style diffusers folder at root; returns the torch modules and the tokenizer.

    T5's vocabulary is the tokenizer's rounded up to a multiple of 64, as T5-XXL's
    32128 exceeds the tokenizer's 32100; the D-DiT text head has the tokenizer's size.
    """
    from dual_diffusion.tokenizer import Tokenizer

    root = Path(root)
    tokenizer = Tokenizer(make_tokenizer(root / "tokenizer_3"))
    vocab = tokenizer.vocab_size
    t5_vocab = -(-(vocab + 1) // 64) * 64
    modules = {"transformer": make_transformer(transformer, vocab, seed, **transformer_options),
               "text_encoder_3": make_t5(t5_vocab, seed + 1), "vae": make_vae(seed + 2)}
    save_transformer(modules["transformer"], root / "transformer", "20KB" if shard_transformer else None)
    modules["text_encoder_3"].save_pretrained(root / "text_encoder_3", safe_serialization=True)
    modules["vae"].save_pretrained(root / "vae", safe_serialization=True)
    (root / "text_encoder").mkdir(exist_ok=True)  # a CLIP folder the converter must ignore
    (root / "text_encoder" / "config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    return {"modules": modules, "tokenizer": tokenizer, "vocab_size": vocab, "t5_vocab_size": t5_vocab}
