r"""Demo: a small D-DiT trained from scratch on the built-in shapes world, offline, on CPU.

  python -m dual_diffusion.train --config=configs/demo.py --workdir=/tmp/ddit_demo

The default world is small enough for a 2-core machine to learn in minutes: one centred object per
image, 4 colors x 3 shapes (DEMO_WORLD). Pixel space (no VAE: the latent is the 16x16 [-1, 1] image,
patch 4 -> 16 tokens), a 4-layer MM-DiT of width 128 and a tiny T5 (random init, trained with the rest
here), a BPE SentencePiece tokenizer trained on the world's captions into WORKDIR/tokenizer on first
run, text rows of 24 tokens. A learned text position table stands in for the positions a from-scratch
T5 cannot give an all-[MASK] caption. 3000 steps at batch 32 per half, peak learning rate 2e-3. Ends by
printing the shapes-suite scores (t2i per category, caption attributes, VQA accuracy) as one JSON line;
the README (The demo) has the measured scores and wall time, and what each lever bought.
Tiny smoke run: --config.train.num_steps=4 --config.train.batch_size=8.

Variants: `configs/demo.py:full` is the full shapes world (1-4 objects, 8 colors, relations) with the
recipe that was the demo before 2026-12-07 (32 px, 32 text tokens, 1600 steps): a 2-core machine does not
learn it in minutes. `configs/demo.py:gpu` is that world and recipe at a size for one accelerator.
"""
from configs import common

# One centred object per image, 4 well separated colors x 3 shapes, larger than the full world's (radius
# 0.19-0.23 of the image: 6-7 px across at 16 px, the sizes the exact reader reads without a miss there).
DEMO_WORLD = dict(colors=("red", "yellow", "green", "blue"), shapes=("circle", "square", "triangle"),
                  min_objects=1, max_objects=1, min_radius=0.19, max_radius=0.23, spread=0.0)


def get_config(arg=None):
    c = common.base_config()
    c.seed = 0
    c.tokenizer.train_corpus = "shapes"
    c.tokenizer.train_vocab_size = 512
    c.tokenizer.train_model_type = "bpe"

    c.model.latent_space = "pixels"
    # The tiny T5 is random here, so it trains with the rest (before the text position table existed this
    # lifted VQA from 0.09 to 0.25 at step 200; not re-measured since).
    c.model.text_encoder_trainable = "all"
    t = c.model.transformer
    t.patch_size, t.in_channels, t.out_channels = 4, 3, 3
    t.num_layers, t.num_attention_heads, t.attention_head_dim = 4, 4, 32
    t.joint_attention_dim = 64
    t.pos_embed_max_size = 16
    t.vocab_size = common.VOCAB_FROM_TOKENIZER
    t.num_null_image_tokens = 4
    t.text_pos_embed_len = 24  # a learned text position table: caption slots start distinguishable
    e = c.model.text_encoder
    e.vocab_size = common.VOCAB_FROM_TOKENIZER
    e.d_model, e.d_kv, e.d_ff, e.num_layers, e.num_heads = 64, 16, 128, 2, 4
    e.relative_attention_num_buckets, e.relative_attention_max_distance = 16, 32

    c.runtime.dtype = "float32"
    c.runtime.scan_layers = False
    c.runtime.remat_policy = "none"
    c.runtime.attention_impl = "xla"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1

    common.set_data(c, image_size=16, text_length=24)  # BPE: VQA rows of this world reach 23 tokens
    # The built-in shapes world, here a small one. Image-to-text rows are 3 VQA to 1 caption: captions are
    # learned by step ~1000 either way, but "is there a <color> <shape>?" (yes iff the question's color is the
    # image's) was at chance after 2000 steps with 1 VQA row in 2, and is learned by steps 1000-2300 so.
    c.data.shapes_world.update(DEMO_WORLD)
    c.data.i2t_sources = [dict(kind="shapes", seed=1, num_records=100_000, weight=1.0,
                               tasks=("caption", "vqa", "vqa", "vqa"))]

    c.loss.lambda_text = 1.0
    # From scratch in minutes: the paper's velocity loss trains the low-noise end that the release's
    # x-prediction form (an s^2 weight) all but ignores; with it, samples keep visible noise.
    c.loss.image_form = "velocity"
    # Timesteps lean toward noise: at 32 px the layout is decided there (colors 0.13 -> 0.37 at mean 0.7).
    c.loss.timestep_mean = 0.7
    # Shapes that hold together (the image loss drops from ~0.08 to ~0.03) come after about as much summed
    # learning rate as 1200 steps at 1e-3 give: 2e-3 reaches it ~400 steps earlier than 1e-3.
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.schedule = "cosine"
    c.optimizer.end_lr_factor = 0.1
    c.optimizer.decay_steps = 0
    c.optimizer.weight_decay = 0.0
    c.optimizer.clip_norm = 1.0
    c.ema.decay = 0.99  # 0.995 lags a run of a few hundred steps (eval uses the EMA weights)

    c.train.batch_size = 32
    c.train.num_steps = 3000
    c.train.log_every = 25
    c.checkpoint.every_steps = 1500
    c.checkpoint.keep = 2
    c.samples.every_steps = 1500  # WORKDIR/samples: an image row for the prompts below + captions
    c.samples.prompts = ("a red circle", "a blue square", "a green triangle", "a yellow circle", "a square",
                         "a triangle")
    c.samples.image_steps = 20
    c.samples.cfg_scale = 3.0
    c.samples.text_steps = 32  # one token per step: fewer clashes such as 'a red squares'
    c.samples.text_method = "confidence"  # trailing EOS first, then content: fewer empty captions
    c.samples.min_new_tokens = 1
    c.eval.shapes_suite = True
    c.eval.shapes_suite_size = 60
    if arg in ("full", "gpu"):
        _full_variant(c)
        if arg == "gpu":
            _gpu_variant(c)
        arg = None
    common.apply_variant(c, arg)
    return common.finalize(c)


def _full_variant(c) -> None:
    """`configs/demo.py:full`: the full shapes world (1-4 objects, 3 shapes, 8 colors, relations) with
    the recipe that was the demo before 2026-12-07 (32 px, 32 text tokens, 1600 steps)."""
    data = common.data_config()
    c.data.shapes_world.update(data.shapes_world)
    c.data.t2i_sources, c.data.i2t_sources = data.t2i_sources, data.i2t_sources
    common.set_data(c, image_size=32, text_length=32)  # BPE: VQA rows of the full world reach ~31 tokens
    c.model.transformer.text_pos_embed_len = 32
    c.optimizer.lr = 1e-3
    c.train.num_steps = 1600
    c.checkpoint.every_steps = 400
    c.samples.every_steps = 400
    c.samples.prompts = ("a red circle", "a blue square", "a green triangle", "two yellow circles")


def _gpu_variant(c) -> None:
    """`configs/demo.py:gpu`: the same world and recipe at a size for one accelerator (an 8-layer,
    width-384 MM-DiT, a 4-layer T5 of width 128, batch 128 per half, 20K steps, bf16 compute)."""
    t = c.model.transformer
    t.num_layers, t.num_attention_heads, t.attention_head_dim = 8, 6, 64
    t.joint_attention_dim = 128
    e = c.model.text_encoder
    e.d_model, e.d_kv, e.d_ff, e.num_layers, e.num_heads = 128, 32, 256, 4, 4
    c.runtime.dtype = "bfloat16"
    c.runtime.attention_impl = "auto"
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 500
    c.ema.decay = 0.999
    c.train.batch_size = 128
    c.train.num_steps = 20_000
    c.train.log_every = 100
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep = 3
    c.samples.every_steps = 2000
    c.eval.shapes_suite_size = 300
