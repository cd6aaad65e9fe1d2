r"""Stage 3 of the release (REFERENCE.md, Objectives): instruction tuning (VQA), answer tokens only.

  python -m dual_diffusion.train --config=configs/stage3.py --workdir=gs://BUCKET/ddit/stage3 \
      --config.init_from=gs://BUCKET/ddit/stage2_converted

LLaVA-Pretrain + LLaVA-v1.5-mix665K (+ TextVQA, VizWiz) in the VQA layout
(`Q: ... Answer the question using a single word or phrase. A: `): the question
is fixed, only answer tokens are masked and scored (the data sets label_mask /
fixed_mask). 512 px, 256 tokens, 50K steps, lambda 1.0 (SFT), batch 256, bf16.
"""
from configs import common


def get_config(arg=None):
    c = common.base_config()
    common.set_data(c, image_size=512, text_length=256, vqa=True)
    common.set_sources(c, t2i=[("json", "FILL_ME/sharegpt4v/captions.jsonl", 1.0)],
                       i2t=[("llava", "FILL_ME/llava_v1_5_mix665k.json", 3.0),
                            ("llava", "FILL_ME/llava_pretrain/blip_laion_cc_sbu_558k.json", 1.0),
                            ("llava", "FILL_ME/textvqa_vizwiz.json", 0.5)])
    c.train.batch_size = 256
    c.train.num_steps = 50_000
    c.loss.lambda_text = 1.0
    common.apply_variant(c, arg)
    return common.finalize(c)
