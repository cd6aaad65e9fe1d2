r"""Stage 2 of the release (REFERENCE.md, Objectives): long captions, 512 px.

  python -m dual_diffusion.train --config=configs/stage2.py --workdir=gs://BUCKET/ddit/stage2 \
      --config.init_from=gs://BUCKET/ddit/stage1_converted
  python -m dual_diffusion.train --config=configs/stage2.py --dry_run     # no weights, no data

512 px (use `configs/stage2.py:256` for 256 px), 256 text tokens, 200K steps,
lambda 0.2, the release's optimizer and EMA, global batch 256 pairs per half, bf16.
Data mix: ShareGPT4V, OpenImages, LAION, Midjourney captions (fill config.data).
Expected --dry_run: params {transformer 2,102,856,100, text_encoder 4,762,310,656,
vae 83,819,683} and the bytes per device of params / optimizer / EMA.
T5 trains its mask row only, a (1, 4096) parameter of its own; its frozen weights are stored in bf16 and
sharded like the rest (sharding.frozen_rules="fsdp"). On v5p / v6e, --config.sharding.frozen_rules=replicated
keeps T5 whole on every chip and halves the collectives per step (README, "Will it fit?").
"""
from configs import common


def get_config(arg=None):
    c = common.base_config()
    size = 256 if arg == "256" else 512
    common.set_data(c, image_size=size, text_length=256)
    mix = [("json", "FILL_ME/sharegpt4v/captions.jsonl", 1.0), ("json", "FILL_ME/openimages/captions.jsonl", 1.0),
           ("wds", "FILL_ME/laion/{00000..09999}.tar", 1.0), ("json", "FILL_ME/midjourney/captions.jsonl", 0.5)]
    common.set_sources(c, t2i=mix, i2t=mix)
    c.train.batch_size = 256
    c.train.num_steps = 200_000
    c.loss.lambda_text = 0.2
    common.apply_variant(c, None if arg in (None, "256", "512") else arg)
    return common.finalize(c)
