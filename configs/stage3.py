r"""Stage 3 of the release (REFERENCE.md, Objectives and Errata): instruction tuning (VQA).

  python -m dual_diffusion.train --config=configs/stage3.py --workdir=gs://BUCKET/ddit/stage3 \
      --config.init_from=gs://BUCKET/ddit/stage2_converted

512 px, 256 tokens, 50K steps, lambda 1.0 (SFT), batch 256, bf16, T5 frozen (the
release trains its mask row in stage 2 only).
Text loss as the release's code: the prompt `Q: {question} [suffix] A: ` is fixed,
the label mask covers the answer and all the EOS padding after it
(data.vqa_label_padding), and the summed weighted loss is divided by B x L
(loss.text_normalization="batch_tokens"; "per_example" is each row's mean).
Each LLaVA conversation gives its first turn only (turns="first"). The prompt suffix
per data set, as the release: "short_answer" ("Answer the question using a single
word or phrase.") for the short-answer VQA sets VQAv2, OKVQA, GQA and TextVQA;
"vizwiz" (LLaVA-1.5's VizWiz prompt, "When the provided information is insufficient,
respond with 'Unanswerable'. Answer ...") for VizWiz; "none" for the LLaVA
conversations (LLaVA-v1.5-mix665K, LLaVA-Pretrain). A question that already ends
with its suffix (mix665K's VQA items) is not given it twice.
Mix: LLaVA-Pretrain + LLaVA-v1.5-mix665K + TextVQA, VizWiz (weights as before: 3 /
1 / 0.5 shared by TextVQA and VizWiz) + the VQAv2, OKVQA and GQA training sets (the
release adds them; its SFT script is not available here, so they get weight 1.0
each, an assumption). The VQA sets are LLaVA-format JSON files, one question per
conversation. Fill in every FILL_ME path.
"""
from configs import common

# (path, weight, suffix) of the VQA stream; every source is kind "llava" with turns="first".
I2T_MIX = (
    ("FILL_ME/llava_v1_5_mix665k.json", 3.0, "none"),
    ("FILL_ME/llava_pretrain/blip_laion_cc_sbu_558k.json", 1.0, "none"),
    ("FILL_ME/textvqa_train.json", 0.25, "short_answer"),
    ("FILL_ME/vizwiz_train.json", 0.25, "vizwiz"),
    ("FILL_ME/vqav2_train.json", 1.0, "short_answer"),
    ("FILL_ME/okvqa_train.json", 1.0, "short_answer"),
    ("FILL_ME/gqa_train.json", 1.0, "short_answer"),
)


def get_config(arg=None):
    c = common.base_config()
    common.set_data(c, image_size=512, text_length=256, vqa=True)
    common.set_sources(c, t2i=[("json", "FILL_ME/sharegpt4v/captions.jsonl", 1.0)], i2t=[])
    c.data.i2t_sources = [dict(kind="llava", path=path, weight=weight, turns="first", suffix=suffix)
                          for path, weight, suffix in I2T_MIX]
    c.data.vqa_label_padding = True
    c.loss.text_normalization = "batch_tokens"
    c.model.text_encoder_trainable = "none"
    c.train.batch_size = 256
    c.train.num_steps = 50_000
    c.loss.lambda_text = 1.0
    common.apply_variant(c, arg)
    return common.finalize(c)
