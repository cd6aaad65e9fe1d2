"""`python -m dual_diffusion.sample` on a tiny converted checkpoint: every task writes what it promises,
and bad arguments give `error: ...`, exit status 2 and no traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import torch_refs
from dual_diffusion import sample
from dual_diffusion.convert.convert_to_jax import convert

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--image-size", "32", "--text-length", "64"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch_refs.require_ref_ddit()
    root = tmp_path_factory.mktemp("sample")
    torch_refs.make_diffusers_folder(root / "src")
    convert(root / "src", root / "dst", progress=False)
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "a.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(root / "m.png")
    return root


def _run(capsys, *argv):
    code = sample.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_text_to_image_grid(checkpoint, capsys, caplog):
    out = checkpoint / "grid.png"
    long = "two squares " * 40  # longer than the 64-token rows: truncated with a warning, as the release does
    code, stdout, _ = _run(capsys, "--checkpoint", checkpoint / "dst", "--task", "t2i", "--prompt", "a red circle",
                           "--prompt", long, "--num-images", "2", "--steps", "2", "--out", out, *SIZE)
    assert code == 0
    assert "prompt 2 ('two squares" in caplog.text and "truncated to 64 tokens" in caplog.text  # jobs: p0 p0 p1 p1
    assert json.loads(stdout)["images"] == 4
    assert Image.open(out).size == (2 * 32, 2 * 32)  # one row per prompt, num_images columns


def test_same_seed_same_image(checkpoint, capsys):
    paths = [checkpoint / f"seed{i}.png" for i in range(2)]
    for p in paths:
        assert _run(capsys, "--checkpoint", checkpoint / "dst", "--task", "t2i", "--prompt", "a dog",
                    "--steps", "2", "--seed", "3", "--out", p, *SIZE)[0] == 0
    np.testing.assert_array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[1])))


def test_caption_vqa_and_inpaint(checkpoint, capsys):
    out = checkpoint / "caps.json"
    code, _, _ = _run(capsys, "--checkpoint", checkpoint / "dst", "--task", "caption", "--image", checkpoint / "a.png",
                      "--image", checkpoint / "a.png", "--length", "8", "--steps", "4", "--out", out, *SIZE)
    assert code == 0
    caps = json.loads(out.read_text())["captions"]
    assert len(caps) == 2 and all(isinstance(c["text"], str) for c in caps)

    code, stdout, _ = _run(capsys, "--checkpoint", checkpoint / "dst", "--task", "vqa", "--image",
                           checkpoint / "a.png", "--question", "what color is it?", "--steps", "4",
                           "--sampler", "threshold", "--threshold", "0.8", "--num-blocks", "2", "--image-cache", "0",
                           *SIZE)
    assert code == 0
    printed = json.loads(stdout)
    assert printed["answers"][0]["question"] == "what color is it?"
    settings = printed["settings"]  # what was used: the flags win over the defaults
    assert (settings["text_length"], settings["steps"], settings["sampler"]) == (64, 4, "threshold")
    assert (settings["threshold"], settings["num_blocks"], settings["image_cache"]) == (0.8, 2, 0)
    assert 2 <= printed["nfe"] <= 4  # network calls per row: a block takes 1 or 2 of the 4 steps

    out = checkpoint / "inpaint.png"
    code, _, _ = _run(capsys, "--checkpoint", checkpoint / "dst", "--task", "inpaint", "--image", checkpoint / "a.png",
                      "--mask", checkpoint / "m.png", "--prompt", "a cat", "--steps", "2", "--out", out, *SIZE)
    assert code == 0
    result = np.asarray(Image.open(out)).astype(int)
    original = sample.read_image(str(checkpoint / "a.png"), 32).astype(int)
    # The kept (black) half is held on the noising path and ends at the VAE round trip of the original,
    # the regenerated half is new: the kept half must be the closer one.
    kept_err = np.abs(result[:, :16] - original[:, :16]).mean()
    new_err = np.abs(result[:, 16:] - original[:, 16:]).mean()
    assert kept_err < new_err


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent/ckpt", "--task", "t2i", "--prompt", "x"], "no such folder"),
    (["--task", "caption", "--image", "/nonexistent.png"], "no such file"),
    (["--task", "caption", "--image", "{bad}"], "cannot read image"),
    (["--task", "t2i", "--prompt", "  "], "empty"),
    (["--task", "caption", "--image", "{img}", "--sampler", "threshold", "--threshold", "1.5"], "threshold=1.5"),
    (["--task", "vqa", "--image", "{img}"], "needs one --question"),
    (["--task", "inpaint", "--image", "{img}", "--prompt", "x"], "one --mask per --image"),
])
def test_bad_arguments(checkpoint, capsys, argv, message):
    bad = checkpoint / "bad.png"
    bad.write_bytes(b"not an image")
    argv = [a.replace("{bad}", str(bad)).replace("{img}", str(checkpoint / "a.png")) for a in argv]
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", str(checkpoint / "dst")] + argv
    code, _, err = _run(capsys, *argv, *SIZE)
    assert code == 2
    assert err.startswith("error: ") and message in err, err


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dual_diffusion.sample", "--checkpoint", str(tmp_path / "none"),
                           "--task", "t2i", "--prompt", "x"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "error: --checkpoint=" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def shapes_tok(tmp_path_factory):
    """(ours, transformers' T5Tokenizer) on one small SentencePiece model of the shapes captions."""
    from dual_diffusion.data import shapes
    from dual_diffusion.tokenizer import Tokenizer, train_sentencepiece

    transformers = pytest.importorskip("transformers")
    model = train_sentencepiece(shapes.shapes_captions_corpus(0, 200), tmp_path_factory.mktemp("tok") / "spiece",
                                vocab_size=300)
    hf = transformers.T5Tokenizer(**transformers.T5Tokenizer.convert_to_native_format(vocab_file=str(model)),
                                  extra_ids=100)
    return Tokenizer(model), hf


def test_decodings_on_a_known_sequence(shapes_tok):
    """first_eos cuts at the first EOS; "release" is the release's code run on transformers' tokenizer:
    captions `decode(ids).replace('</s>', '')`, VQA `text[:text.find('</s>')]`."""
    from dual_diffusion.inference.pipelines import decode_text

    tok, hf = shapes_tok
    first, second = tok.encode("a red circle"), tok.encode("two blue squares")  # each ends with EOS
    ids = first + second + [tok.pad_id] + [tok.eos_id] * 3
    assert decode_text(tok, ids) == "a red circle"
    release_caption = hf.decode(ids).replace("</s>", "")
    assert decode_text(tok, ids, task="caption", decoding="release") == release_caption
    assert "two blue squares" in release_caption and "<pad>" in release_caption  # kept after the first EOS
    text = hf.decode(ids)
    assert decode_text(tok, ids, task="vqa", decoding="release") == text[:text.find("</s>")] == "a red circle"
    no_eos = tok.encode("a red circle", add_eos=False)
    assert decode_text(tok, no_eos) == "a red circle"
    assert decode_text(tok, no_eos, task="vqa", decoding="release") == "a red circl"  # the script's find() == -1
    with pytest.raises(ValueError, match="decoding='greedy'"):
        decode_text(tok, ids, decoding="greedy")


def test_text_row_lengths_resolved_per_checkpoint():
    """Caption and VQA rows: the release's 128 tokens for a converted checkpoint whatever it trained at,
    a workdir's own length when shorter, an explicit length everywhere; prompts keep 256 / the trained length."""
    from types import SimpleNamespace

    from dual_diffusion.inference.pipelines import Pipeline

    graphdefs = {"transformer": None, "text_encoder": None}

    def rows(info, **kw):
        pipe = Pipeline.from_bundle(SimpleNamespace(info=info, configs={}, graphdefs=graphdefs, tokenizer=None), **kw)
        return pipe.text_length, pipe.caption_text_length, pipe.vqa_text_length

    assert rows({"components": {}}) == (256, 128, 128)  # converted: no training length recorded
    assert rows({"step": 10, "text_length": 256}) == (256, 128, 128)
    assert rows({"step": 10, "text_length": 32}) == (32, 32, 32)  # the demo's workdir
    assert rows({"components": {}}, text_length=64) == (64, 64, 64)


def test_release_text_defaults_on_converted_checkpoint(checkpoint):
    """No --text-length / --steps: captions 128 tokens 64 steps, VQA 128 tokens 32 steps, t2i 256 / 28,
    whatever length the converted model trained at."""
    from dual_diffusion.inference.pipelines import Pipeline
    from dual_diffusion.checkpoints.pretrained import load_pretrained

    bundle = load_pretrained(checkpoint / "dst", components=("transformer", "text_encoder"))
    pipe = Pipeline.from_bundle(bundle)
    assert (pipe.text_length, pipe.caption_text_length, pipe.vqa_text_length) == (256, 128, 128)
    # Prompts padded with the pad token the tokenizer folder declares (none here: T5's <pad>), as the
    # converter recorded it; --prompt-padding=eos as training did.
    assert bundle.info["tokenizer"]["pad_token"] == "<pad>" and pipe.pad_id == 0
    assert Pipeline.from_bundle(bundle, prompt_padding="eos").pad_id == 1
    parse = lambda *a: sample.parse_args(["--checkpoint", "x", *a])  # noqa: E731
    caption, vqa = sample.text_options(parse("--task", "caption")), sample.text_options(parse("--task", "vqa"))
    assert (caption.steps, caption.method, caption.decoding) == (64, "ancestral", "first_eos")
    assert (vqa.steps, vqa.method, vqa.decoding) == (32, "ancestral", "first_eos")
    assert sample.text_options(parse("--task", "vqa", "--steps", "8", "--decoding", "release")).decoding == "release"
    assert parse("--task", "t2i").grid == "diffusers"


def test_image_condition_mean_or_posterior_draw(checkpoint):
    """"mean": (mean - shift) * scale; "sample": the release's (posterior draw - shift) * scale."""
    import jax

    from dual_diffusion.models.vae import sample_posterior
    from dual_diffusion.inference.pipelines import Pipeline, to_float
    from dual_diffusion.checkpoints.pretrained import load_pretrained

    bundle = load_pretrained(checkpoint / "dst")
    pipe = Pipeline.from_bundle(bundle, image_size=32)
    vae = bundle.model("vae")
    images = to_float(sample.read_image(str(checkpoint / "a.png"), 32)[None])
    rng = jax.random.key(5)
    mean_latents, same_rng = pipe._image_condition(vae, images, rng, "mean")
    assert same_rng is rng
    np.testing.assert_allclose(mean_latents, (vae.encode(images) - pipe.vae_shift) * pipe.vae_scale, atol=1e-6)
    drawn, next_rng = pipe._image_condition(vae, images, rng, "sample")
    mean, logvar = vae.encode_moments(images)
    want = (sample_posterior(mean, logvar, jax.random.split(rng)[1]) - pipe.vae_shift) * pipe.vae_scale
    np.testing.assert_allclose(drawn, want, atol=1e-6)
    assert float(np.abs(np.asarray(drawn) - np.asarray(mean_latents)).max()) > 1e-3
    np.testing.assert_array_equal(jax.random.key_data(next_rng), jax.random.key_data(jax.random.split(rng)[0]))


def test_guidance_only_above_one_and_image_cache_refreshed_every_call(checkpoint):
    """As the release's do_classifier_free_guidance, CFG runs only when the scale is > 1 (0.5 samples what
    1 does); captions with the image cache refreshed every call are the uncached sampler's."""
    from dual_diffusion.inference.pipelines import ImageOptions, Pipeline, TextOptions
    from dual_diffusion.checkpoints.pretrained import load_pretrained

    import jax

    bundle = load_pretrained(checkpoint / "dst")
    pipe = Pipeline.from_bundle(bundle, image_size=32, text_length=16)
    ids = pipe.encode_prompts(["a red circle"])
    shape = pipe.latent_shape(bundle.states)
    program = lambda cfg: str(jax.make_jaxpr(lambda s: pipe._images_fn(  # noqa: E731
        s, np.uint32(0), np.arange(1, dtype=np.int32), ids, ids, None, None,
        opts=ImageOptions(steps=2, cfg_scale=cfg), latent_shape=shape))(bundle.states))
    assert program(0.5) == program(1.0) != program(1.5)  # the same program: no unconditional branch
    images = np.stack([sample.read_image(str(checkpoint / "a.png"), 32)] * 2)
    caption = lambda cache: pipe.caption(bundle.states, images, seed=2, opts=TextOptions(  # noqa: E731
        steps=8, method="threshold", num_blocks=2, threshold=0.5, image_cache=cache))
    assert caption(1) == caption(None)
    assert pipe.text_calls["caption"][:2] == pipe.text_calls["caption"][2:]
