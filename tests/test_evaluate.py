"""Evaluation: suites over a tiny random pixel-space pipeline (scores in range, batching keeps order),
VQAv2 normalisation/accuracy on official-style cases, GenEval's folder layout, and the CLI's error paths
(`error: ...`, exit 2, no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dual_diffusion  # noqa: F401  (NNX sharding flag)
from dual_diffusion import evaluate
from dual_diffusion.evaluation import metrics, suites
from dual_diffusion.data import shapes, shapes_eval
from dual_diffusion.inference.pipelines import ImageOptions, Pipeline, TextOptions

REPO = Path(__file__).resolve().parents[1]
FAST_IMAGES, FAST_TEXT = ImageOptions(steps=2), TextOptions(steps=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(pipeline, states): random 1-layer MM-DiT + T5 in pixel space, 32 px, 64 tokens, shapes tokenizer."""
    from flax import nnx

    from dual_diffusion.models.configs import MMDiTConfig, Runtime, T5Config
    from dual_diffusion.models.mmdit import MMDiT
    from dual_diffusion.models.t5 import T5Encoder
    from dual_diffusion.tokenizer import Tokenizer, train_sentencepiece

    folder = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(train_sentencepiece(shapes.shapes_captions_corpus(0, 200), folder / "spiece", vocab_size=400))
    runtime = Runtime(attention_impl="xla")
    mmdit = MMDiT(MMDiTConfig(sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=1,
                              num_attention_heads=2, attention_head_dim=8, joint_attention_dim=16,
                              pos_embed_max_size=8, vocab_size=tok.vocab_size, num_null_image_tokens=2),
                  runtime, rngs=nnx.Rngs(0))
    t5 = T5Encoder(T5Config(vocab_size=tok.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4),
                   runtime, rngs=nnx.Rngs(1))
    (g_mmdit, s_mmdit), (g_t5, s_t5) = nnx.split(mmdit), nnx.split(t5)
    pipe = Pipeline({"transformer": g_mmdit, "text_encoder": g_t5}, tok, text_length=64, image_size=32)
    return pipe, {"transformer": s_mmdit, "text_encoder": s_t5}


def _values(scores: dict) -> list:
    return [v for part in ("t2i", "captions", "vqa") for v in scores[part].values() if v is not None]


def test_shapes_suite_on_random_model(tiny):
    pipe, states = tiny
    scores = suites.shapes_suite(pipe, states, per_category=1, num_captions=3, num_vqa=3, batch_size=2,
                                      image_opts=FAST_IMAGES, text_opts=FAST_TEXT, caption_length=12,
                                      progress=False)
    assert set(scores["t2i"]) == set(shapes_eval.CATEGORIES) | {"overall"}
    assert {"exact_match", "attribute_accuracy"} <= set(scores["captions"]) and "accuracy" in scores["vqa"]
    values = _values(scores)
    assert values and all(0.0 <= v <= 1.0 for v in values), scores
    table = suites.markdown_table(scores)
    assert "| t2i / overall |" in table and "| vqa / accuracy |" in table and "caption_examples" not in table


class _OraclePipeline:
    """Answers from its inputs only (renders each prompt's oracle scene, reads images back), so it
    scores 1.0 exactly when the suite keeps every output with its own input through the batching."""

    image_size = 32

    def __init__(self, real: Pipeline, seed, per_category):
        self.tokenizer, self.text_length, self.encode_prompts = real.tokenizer, real.text_length, real.encode_prompts
        self.vqa_text_length = real.vqa_text_length
        self.scenes = {s.prompt: s.scene for s in shapes_eval.t2i_prompt_set(seed, per_category)}

    def text_to_image(self, states, prompts, *, seed, indices, opts):
        return np.stack([shapes.render(self.scenes[p], self.image_size) for p in prompts])

    def caption(self, states, images, *, seed, indices, length, opts):
        return [shapes.list_caption(shapes_eval.scene_from_image(im)) for im in images]

    def answer(self, states, images, questions, *, seed, indices, opts):
        return [shapes_eval.answer_from_image(im, q) for im, q in zip(images, questions)]


def test_shapes_suite_keeps_outputs_aligned_through_padded_batches(tiny):
    # 3 per category * 6 categories = 18 prompts, 7 captions, 5 questions: none a multiple of 4.
    scores = suites.shapes_suite(_OraclePipeline(tiny[0], 1234, 3), None, per_category=3, num_captions=7,
                                      num_vqa=5, batch_size=4, progress=False)
    assert min(_values(scores)) == 1.0, scores


@pytest.mark.parametrize("pred, humans, expected", [
    ("Two", ["2"] * 10, 1.0),
    ("a dog", ["dog"] * 10, 1.0),
    ("yes.", ["yes"] * 10, 1.0),
    ("dont know", ["don't know"] * 10, 1.0),
    ("1.5", ["1.5"] * 10, 1.0),  # a period before a digit stays
    ("red", ["red"] * 3 + ["blue"] * 7, 0.9),  # leave-one-out: 3 subsets with 2 matches (2/3), 7 with 3 (1)
    ("red", ["red"] * 4 + ["blue"] * 6, 1.0),
    ("red", ["red"] + ["blue"] * 9, 0.3),  # 9 subsets with 1 match (1/3), 1 with none
    ("green", ["red"] * 10, 0.0),
])
def test_vqa_accuracy_official_cases(pred, humans, expected):
    assert metrics.vqa_accuracy(pred, humans) == pytest.approx(expected)


def test_vqa_normalisation():
    norm = metrics.vqa_normalize
    assert norm("  The Two dogs!\n") == "2 dogs"
    assert norm("black and white") == "black and white"
    assert norm("t-shirt") == "t shirt" and norm("- no") == "no"  # spaced vs touching punctuation
    assert norm("10,000") == "10000" and norm("couldnt've") == "couldn't've"
    scores = metrics.vqa_scores(["yes", "3"], [["yes"] * 10, ["two"] * 10], ["yes/no", "number"])
    assert scores == {"accuracy": 0.5, "n": 2, "accuracy_number": 0.0, "accuracy_yes_no": 1.0}


def test_coco_tokenize_and_missing_package(monkeypatch):
    assert metrics.coco_tokenize("A man's T-shirt, (red)!") == "a man 's t-shirt red"
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # behaves as not installed
    with pytest.raises(metrics.MissingPackageError, match="pycocoevalcap"):
        metrics.cider_score({1: ["a cat"]}, {1: "a cat"})


def test_coco_and_vqav2_suites_read_files(tiny, tmp_path):
    pipe, states = tiny
    g = np.random.default_rng(0)
    for image_id, shape in ((7, (40, 50, 3)), (42, (64, 30, 3))):  # resized and centre-cropped to 32
        Image.fromarray(g.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / f"COCO_val2014_{image_id:012d}.jpg")
    caps = {"images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}, {"id": 42, "file_name": "x.jpg"}],
            "annotations": [{"image_id": 7, "caption": "a cat"}, {"image_id": 42, "caption": "a dog"},
                            {"image_id": 7, "caption": "one cat"}]}
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    seen = {}
    scorer = lambda refs, preds: seen.update(refs=refs, preds=preds) or {"CIDEr": 0.0}  # noqa: E731
    scores = suites.coco_captions_suite(pipe, states, annotations=tmp_path / "caps.json", images_dir=tmp_path,
                                             batch_size=4, text_opts=FAST_TEXT, caption_length=8, scorer=scorer,
                                             progress=False)
    assert scores["CIDEr"] == 0.0 and seen["refs"] == {7: ["a cat", "one cat"], 42: ["a dog"]}
    assert sorted(seen["preds"]) == [7, 42] and all(isinstance(p, str) for p in seen["preds"].values())

    qs = {"questions": [{"question_id": 1, "image_id": 42, "question": "what color is the circle?"}]}
    ann = {"annotations": [{"question_id": 1, "image_id": 42, "answer_type": "other",
                            "answers": [{"answer": "red"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(ann))
    scores = suites.vqav2_suite(pipe, states, questions=tmp_path / "q.json", annotations=tmp_path / "a.json",
                                     images_dir=tmp_path, batch_size=4, text_opts=FAST_TEXT, progress=False)
    assert scores["n"] == 1 and 0.0 <= scores["accuracy"] <= 1.0 and "accuracy_other" in scores
    (tmp_path / "COCO_val2014_000000000042.jpg").write_bytes(b"not an image")
    with pytest.raises(suites.EvalDataError, match="000000000042"):
        suites.vqav2_suite(pipe, states, questions=tmp_path / "q.json", annotations=tmp_path / "a.json",
                                images_dir=tmp_path, text_opts=FAST_TEXT, progress=False)


def test_geneval_folder_layout(tiny, tmp_path):
    pipe, states = tiny
    records = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a red circle"},
               {"tag": "two_object", "prompt": "a blue square and a green triangle"}]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = suites.read_geneval_prompts(tmp_path / "meta.jsonl")
    out = tmp_path / "geneval"
    result = suites.geneval_suite(pipe, states, prompts=prompts, out_dir=out, samples_per_prompt=3,
                                       batch_size=4, image_opts=FAST_IMAGES, progress=False)
    assert result["images"] == 6 and sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    for index, record in enumerate(records):
        folder = out / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == record
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
        assert Image.open(folder / "samples" / "0000.png").size == (32, 32)
    (tmp_path / "bad.jsonl").write_text('{"tag": "x"}\n')
    with pytest.raises(suites.EvalDataError, match="bad.jsonl:1"):
        suites.read_geneval_prompts(tmp_path / "bad.jsonl")


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "dual_diffusion.evaluate", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_missing_checkpoint_and_unknown_suite(tmp_path):
    out = _cli("--checkpoint", tmp_path / "nope", "--suite=shapes")
    assert out.returncode == 2 and "error:" in out.stderr and "nope" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    out = _cli("--checkpoint", tmp_path, "--suite=imagenet")
    assert out.returncode == 2 and "error:" in out.stderr and "imagenet" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("argv, message", [
    (["--suite=coco_captions", "--images", "{tmp}"], "needs --annotations"),
    (["--suite=coco_captions", "--annotations", "{tmp}/missing.json", "--images", "{tmp}"], "missing.json"),
    (["--suite=vqav2", "--questions", "{tmp}/q.json", "--annotations", "{tmp}/q.json", "--images", "{tmp}/no"],
     "no such folder"),
    (["--suite=geneval", "--prompts", "{tmp}/q.json"], "needs --out_dir"),
    (["--suite=shapes", "--batch_size=0"], "--batch_size=0"),
    (["--suite=shapes"], "cannot load"),  # an empty folder is no checkpoint
    (["--suite=shapes", "--preset=demo"], "--preset=demo: the config of"),  # {tmp}/config.json is {}
    (["--suite=shapes", "--preset=demo", "--release-decoding"], "two different protocols"),
])
def test_cli_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "q.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    code = evaluate.main(["--checkpoint", str(tmp_path)] + [a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and message in err, err


def test_cli_oracle_writes_scores(tmp_path, capsys):
    code = evaluate.main(["--suite=shapes", "--oracle", "--image_size=32", "--per_category=2", "--num_captions=4",
                          "--num_vqa=4", "--out_dir", str(tmp_path)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "scores.json").read_text())["t2i"] == printed["t2i"]
    assert "| t2i / overall | 1.0000 |" in (tmp_path / "scores.md").read_text()


def test_cli_oracle_scores_the_world_of_a_workdir(tmp_path, capsys):
    """--oracle --checkpoint=WORKDIR: the truth of the world in WORKDIR/config.json, its categories only."""
    world = dict(colors=["red", "blue"], shapes=["square", "triangle"], min_objects=1, max_objects=1,
                 min_radius=0.18, max_radius=0.24, spread=0.5)
    (tmp_path / "config.json").write_text(json.dumps({"data": {"shapes_world": world}}))
    code = evaluate.main(["--suite=shapes", "--oracle", "--checkpoint", str(tmp_path), "--image_size=32",
                          "--per_category=4", "--num_captions=6", "--num_vqa=6", "--out_dir", str(tmp_path)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["world"] == world and set(printed["t2i"]) == {"single_object", "colors", "overall"}
    assert min(v for part in ("t2i", "captions", "vqa_answered_from_pixels") for v in printed[part].values()
               if v is not None) == 1.0
    (tmp_path / "config.json").write_text(json.dumps({"data": {"shapes_world": dict(world, colors=["mauve"])}}))
    code = evaluate.main(["--suite=shapes", "--oracle", "--checkpoint", str(tmp_path), "--out_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot read the shapes world") and "mauve" in err, err


@pytest.mark.slow  # ~10 s of torch model building and conversion, ~8 s of compiles
def test_cli_shapes_on_converted_checkpoint(tmp_path, capsys):
    """The whole path: load_pretrained (with a VAE) -> Pipeline -> suite -> CHECKPOINT/eval/scores.{json,md}."""
    import torch_refs
    from dual_diffusion.convert.convert_to_jax import convert

    torch_refs.require_ref_ddit()
    torch_refs.make_diffusers_folder(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
    capsys.readouterr()
    short = evaluate.main(["--checkpoint", str(tmp_path / "dst"), "--suite=shapes", "--text_length=4"])
    err = capsys.readouterr().err
    assert short == 2 and err.startswith("error: prompt") and "raise --text_length" in err, err
    # Text to image only: each sampler is a separate compile, and the suites are tested above.
    code = evaluate.main(["--checkpoint", str(tmp_path / "dst"), "--suite=shapes", "--image_size=16",
                          "--text_length=48", "--per_category=1", "--num_captions=0", "--num_vqa=0",
                          "--batch_size=8", "--t2i_steps=1"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written_to"] == str(tmp_path / "dst" / "eval") and set(printed["t2i"]) >= {"overall"}
    assert all(0.0 <= v <= 1.0 for v in printed["t2i"].values())
    assert json.loads((tmp_path / "dst" / "eval" / "scores.json").read_text())["t2i"] == printed["t2i"]
    assert "| t2i / overall |" in (tmp_path / "dst" / "eval" / "scores.md").read_text()


def test_preset_demo_resolves_to_the_trainers_end_of_training_settings(tmp_path, monkeypatch, capsys):
    """`evaluate --preset=demo` on a demo workdir calls the shapes suite exactly as the trainer's final
    evaluation does (same options, seed, sizes, counts, batch), reading them from WORKDIR/config.json."""
    from types import SimpleNamespace

    import jax

    from dual_diffusion.inference import sharded
    from dual_diffusion.sharding import make_mesh
    from dual_diffusion.training import samples as training_samples

    sys.path.insert(0, str(REPO))
    from configs import demo

    config = demo.get_config()
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    calls = []
    monkeypatch.setattr(suites, "shapes_suite",
                        lambda pipeline, states, **kw: calls.append((pipeline, kw)) or {"suite": "shapes"})
    graphdefs = {"transformer": None, "text_encoder": None}
    split = SimpleNamespace(graphdefs=graphdefs, network_states=lambda weights, frozen: {})
    trainer = training_samples.Sampler(config, SimpleNamespace(split=split), None, None, None)
    trainer.shapes_suite({"params": {}}, {})
    # The workdir as load_pretrained reads it (sizes from its config.json), without networks.
    bundle = SimpleNamespace(info={"step": 1600, "image_size": 32, "text_length": 32}, configs={},
                             graphdefs=graphdefs, tokenizer=None, states={})
    runtimes = []
    mesh = make_mesh(devices=jax.devices()[:1])
    monkeypatch.setattr(sharded, "load_on_mesh", lambda path, runtime, **mesh_flags: runtimes.append(runtime)
                        or (bundle, mesh, sharded.MeshChoice(1, 1, 1, "one device")))
    assert evaluate.main(["--checkpoint", str(workdir), "--suite=shapes", "--preset=demo",
                          "--out_dir", str(tmp_path / "out")]) == 0
    (train_pipe, train_kw), (eval_pipe, eval_kw) = calls
    assert eval_kw.pop("vqa_opts") == train_kw["text_opts"] and eval_kw.pop("caption_length") is None
    assert eval_kw.pop("journal").path == tmp_path / "out" / "partial_shapes.jsonl"  # resume: no effect on items
    train_kw.pop("progress", None)  # display only
    assert eval_kw == train_kw
    for size in ("image_size", "text_length", "caption_text_length", "vqa_text_length"):
        assert getattr(eval_pipe, size) == getattr(train_pipe, size), size
    assert runtimes[0].dtype == config.runtime.dtype
    # The demo's own numbers, not evaluate's defaults (CFG 7, 28 steps, ancestral, 200 items).
    image, text = train_kw["image_opts"], train_kw["text_opts"]
    assert (image.cfg_scale, image.steps) == (config.samples.cfg_scale, config.samples.image_steps) != (7.0, 28)
    assert (text.method, text.steps) == (config.samples.text_method, config.samples.text_steps)
    assert train_kw["num_vqa"] == config.eval.shapes_suite_size != 200
    # The run's own world (a one-object one: two t2i categories share the prompts), not the full world.
    assert train_kw["world"] == shapes.World(**config.data.shapes_world) != shapes.FULL_WORLD
    assert train_kw["per_category"] == config.eval.shapes_suite_size // 2
    # An explicit flag still wins over the preset.
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(workdir), "--suite=shapes", "--preset=demo", "--num_vqa=7",
                          "--cfg=5", "--out_dir", str(tmp_path / "out")]) == 0
    assert calls[-1][1]["num_vqa"] == 7 and calls[-1][1]["image_opts"].cfg_scale == 5.0
    assert calls[-1][1]["text_opts"] == train_kw["text_opts"]


def test_release_decoding_resolves_the_release_protocol():
    """--release-decoding: ancestral, 64 caption / 32 VQA steps, a posterior draw as the image, the release's
    decoding; the defaults differ only in decoding and image latents; explicit flags override."""
    from dual_diffusion.inference.pipelines import ImageOptions

    parse = lambda *a: evaluate.resolve_settings(evaluate.parse_args(["--checkpoint", "x", *a]))  # noqa: E731
    release = parse("--suite=vqav2", "--release-decoding")
    for opts, steps in ((release["caption_opts"], 64), (release["vqa_opts"], 32)):
        assert (opts.method, opts.steps, opts.temperature, opts.min_new_tokens) == ("ancestral", steps, 1.0, 0)
        assert (opts.decoding, opts.image_latents) == ("release", "sample")
    assert release["image_opts"] == ImageOptions() and release["image_opts"].grid == "diffusers"
    assert release["text_length"] is None  # Pipeline.from_bundle: 128-token caption / VQA rows
    default = parse("--suite=vqav2")
    assert (default["caption_opts"].steps, default["vqa_opts"].steps) == (64, 32)
    assert (default["vqa_opts"].decoding, default["vqa_opts"].image_latents) == ("first_eos", "mean")
    assert parse("--release-decoding", "--text_steps=16")["caption_opts"].steps == 16


def test_fast_decoding_flags_and_nfe_in_the_scores(tmp_path, monkeypatch, capsys):
    """--sampler=threshold --threshold --num_blocks --image_cache --text_cache reach both TextOptions (a bare
    --image_cache is R = 0); the printed scores give the mean network calls per row of each text task."""
    from types import SimpleNamespace

    import jax

    from dual_diffusion.inference import sharded
    from dual_diffusion.sharding import make_mesh

    parse = lambda *a: evaluate.resolve_settings(evaluate.parse_args(["--checkpoint", "x", *a]))  # noqa: E731
    st = parse("--sampler=threshold", "--threshold=0.8", "--num_blocks=2", "--image_cache")
    for opts in (st["caption_opts"], st["vqa_opts"]):
        assert (opts.method, opts.threshold, opts.num_blocks, opts.image_cache) == ("threshold", 0.8, 2, 0)
    assert parse("--image_cache=3")["vqa_opts"].image_cache == 3 and parse()["vqa_opts"].image_cache is None
    assert parse("--sampler=threshold", "--text_cache")["caption_opts"].text_cache and not parse()["vqa_opts"].text_cache

    def suite(pipeline, states, **kw):  # stands in for the decoding: 3 and 5 calls for two captions
        pipeline.text_calls["caption"] += [3, 5]
        return {"suite": "shapes"}

    monkeypatch.setattr(suites, "shapes_suite", suite)
    bundle = SimpleNamespace(info={"step": 1, "image_size": 32, "text_length": 32}, configs={},
                             graphdefs={"transformer": None, "text_encoder": None}, tokenizer=None, states={})
    mesh = make_mesh(devices=jax.devices()[:1])
    monkeypatch.setattr(sharded, "load_on_mesh", lambda path, runtime, **mesh_flags:
                        (bundle, mesh, sharded.MeshChoice(1, 1, 1, "one device")))
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(tmp_path), "--out_dir", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == {"caption": 4.0}


def test_pipeline_applies_the_decoding_option(tiny):
    """Captions and answers are decode_text of the sampled ids under the option's decoding."""
    import dataclasses

    from dual_diffusion.inference.pipelines import decode_text

    pipe, states = tiny
    images = shapes_eval.caption_eval_set(0, 2, 32).images
    opts = dataclasses.replace(FAST_TEXT, decoding="release")
    ids = np.full((2, pipe.caption_text_length), pipe.tokenizer.eos_id, np.int32)
    raw = pipe.fill_text(states, images, ids, np.zeros(ids.shape, bool), seed=3, opts=opts)
    assert pipe.caption(states, images, seed=3, opts=opts) == [
        decode_text(pipe.tokenizer, row, task="caption", decoding="release") for row in raw]
    assert pipe.caption(states, images, seed=3, opts=FAST_TEXT) == [decode_text(pipe.tokenizer, row) for row in raw]
