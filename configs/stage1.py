r"""Stage 1 of the release (REFERENCE.md, Objectives): image-text alignment from SD3-medium.

  python -m dual_diffusion.train --config=configs/stage1.py --workdir=gs://BUCKET/ddit/stage1 \
      --config.init_from=/path/to/converted_sd3 --config.data.sources=...
  (dry run: add --dry_run; the same command on every TPU host, launch/README.md)

256 px, 64 text tokens, 60K steps, lambda 0.2 (pretraining), AdamW 3e-5, wd 1e-2,
2000 warmup, clip 2.0, EMA 0.9999 (the release's code), global batch 512 pairs per
half, bf16. T5 stays frozen (the release trains its mask row in stage 2 only), so it
costs a forward pass only. Latents are VAE posterior draws; images under 256 px or
wider than 4:1 are skipped (data.min_image_side, data.max_aspect_ratio).
Fill in: init_from (tools/convert_sd3_weights.py output of SD3-medium) and the
recaptioned DataComp source of config.data.
"""
from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.set_data(c, image_size=256, text_length=64)
    common.set_sources(c, t2i=[("wds", "FILL_ME/datacomp_recap/{00000..09999}.tar", 1.0)],
                       i2t=[("wds", "FILL_ME/datacomp_recap/{00000..09999}.tar", 1.0)])
    c.train.batch_size = 512
    c.train.num_steps = 60_000
    c.loss.lambda_text = 0.2
    c.model.text_encoder_trainable = "none"
    common.apply_variant(c, arg)
    return common.finalize(c)
