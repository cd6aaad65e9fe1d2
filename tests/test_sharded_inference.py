"""Inference at scale (inference/sharded.py, evaluation/stream.py): the same outputs on 1 device, 8 devices and
2 processes x 4 devices; evaluation resumed after a crash gives the scores of one uninterrupted run, with every
item made once; the mesh defaults and their errors."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import multihost
from dual_diffusion import evaluate, sample
from test_tpu_compile import libtpu  # noqa: F401  (the fixture: skips without libtpu, fails in CI)
from dual_diffusion.checkpoints.pretrained import load_pretrained
from dual_diffusion.evaluation import stream, suites
from dual_diffusion.inference import sharded
from dual_diffusion.inference.pipelines import ImageOptions, Pipeline, TextOptions
from dual_diffusion.sharding import make_mesh

GiB = 2 ** 30
# One suite run: 6 prompts, 5 captions, 5 questions in batches of 4 (each part ends in a padded batch).
SUITE = dict(seed=7, per_category=1, num_captions=5, num_vqa=5, batch_size=4, image_opts=ImageOptions(steps=2),
             text_opts=TextOptions(steps=4), vqa_opts=TextOptions(steps=4), caption_length=None)
SUITE_FLAGS = ["--suite=shapes", "--seed=7", "--per_category=1", "--num_captions=5", "--num_vqa=5",
               "--batch_size=4", "--t2i_steps=2", "--text_steps=4", "--image_size=16", "--text_length=64"]


def write_checkpoint(dst, tokenizer_model, seed: int = 0) -> None:
    """A converted checkpoint of tiny random networks (1-layer MM-DiT and T5, a 2-block VAE: 16 px -> 8x8x4)."""
    import shutil

    from dual_diffusion.convert import components as comp
    from dual_diffusion.models.configs import MMDiTConfig, Runtime, T5Config, VAEConfig
    from dual_diffusion.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_model).vocab_size
    configs = {"transformer": MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                          num_attention_heads=2, attention_head_dim=8, joint_attention_dim=16,
                                          pos_embed_max_size=8, vocab_size=vocab, num_null_image_tokens=2),
               "text_encoder": T5Config(vocab_size=vocab, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4),
               "vae": VAEConfig(latent_channels=4, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                mid_block_add_attention=False)}
    g = np.random.default_rng(seed)
    for name, cfg in configs.items():  # random values for every array (an eager init takes 20 s to compile)
        abstract = comp.flat_variables(comp.COMPONENTS[name].build_abstract(cfg, Runtime()))
        comp.save_flat(dst / comp.PARAMS_DIR / name, {p: (0.2 * g.standard_normal(v.get_value().shape)).astype(
            v.get_value().dtype) for p, v in abstract.items()})
    (dst / comp.TOKENIZER_DIR).mkdir()
    shutil.copy(tokenizer_model, dst / comp.TOKENIZER_DIR / "spiece.model")
    (dst / comp.INFO_FILE).write_text(json.dumps({
        "format": comp.FORMAT, "version": comp.FORMAT_VERSION,
        "tokenizer": {"folder": comp.TOKENIZER_DIR, "model_file": "spiece.model"},
        "components": {name: {"config": cfg.to_dict()} for name, cfg in configs.items()}}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dual_diffusion.data import shapes
    from dual_diffusion.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("sharded")
    model = train_sentencepiece(shapes.shapes_captions_corpus(0, 200), root / "spiece", vocab_size=400)
    write_checkpoint(root / "ckpt", model)
    return root / "ckpt"


def pipeline_on(checkpoint, devices, fsdp: int = 1):
    mesh = make_mesh(len(devices) // fsdp, fsdp, 1, devices=devices)
    bundle = load_pretrained(checkpoint, mesh=mesh)
    return Pipeline.from_bundle(bundle, image_size=16, text_length=64, mesh=mesh), bundle.states


@pytest.fixture(scope="module")
def on8(checkpoint):
    """(pipeline, states) on all 8 host devices: batch over data=4 x fsdp=2, the weights FSDP-sharded."""
    return pipeline_on(checkpoint, jax.devices(), fsdp=2)


def _items(path) -> dict:
    """{part: {index: result}} of a journal or items file, each item counted (a repeat raises)."""
    out: dict = {}
    for line in path.read_text().splitlines()[1:]:
        record = json.loads(line)
        for index, result in record["items"]:
            assert index not in out.setdefault(record["part"], {}), f"item {record['part']} {index} twice"
            out[record["part"]][index] = result
    return out


def _json_output(stdout: str) -> dict:
    """The JSON object a command printed (from its first line that opens one)."""
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("{")):]))


def _scores(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k != "throughput"}


def test_mesh_defaults_and_errors():
    # CPU devices report no memory: the weights are taken to fit, replicated, and the note says so.
    c = sharded.choose_mesh(30 * GiB, 8, None)
    assert (c.data, c.fsdp, c.tensor) == (8, 1, 1) and "CPU" in c.note
    assert (sharded.choose_mesh(13 * GiB, 8, 16 * GiB).fsdp, sharded.choose_mesh(14 * GiB, 8, 16 * GiB).fsdp) == (1, 2)
    assert sharded.choose_mesh(int(13.15 * GiB), 8, int(15.75 * GiB)).fsdp == 1  # the 7B stack in bf16 on v5e
    c = sharded.choose_mesh(60 * GiB, 8, 16 * GiB)  # 7.5 GiB per device with fsdp=8 <= 13.6 GiB; 4 would be 15
    assert (c.data, c.fsdp) == (1, 8) and "fsdp=8" in c.note
    assert (sharded.choose_mesh(1, 8, None, fsdp=2).data, sharded.choose_mesh(1, 8, None, data=2).fsdp) == (4, 4)
    assert (sharded.choose_mesh(1, 8, None, tensor=2).data, sharded.choose_mesh(1, 8, None, tensor=2).tensor) == (4, 2)
    for flags, message in [(dict(data=3), "--mesh_data=3: expected a divisor of the 8"),
                           (dict(data=4, fsdp=4), "must be the 8 devices"),
                           (dict(), "exceed 85% of the 8 devices' memory")]:
        with pytest.raises(sharded.MeshError, match=message):
            sharded.choose_mesh(200 * GiB, 8, 16 * GiB, **flags)
    assert list(sharded.padded_rows(5, 4)) == [0, 1, 2, 3, 4, 4, 4, 4]


def test_same_outputs_on_1_8_and_2x4_devices(checkpoint, on8, tmp_path):
    """Images (by digest), captions, answers and scores of the shapes suite: 8 devices with FSDP weights, one
    device, and `evaluate` run as 2 processes x 4 devices of one gloo cluster."""
    pipe8, states8 = on8
    journal = stream.PartialResults.open(tmp_path / "on8.jsonl", {"run": "on8"})
    scores8 = suites.shapes_suite(pipe8, states8, progress=False, journal=journal, **SUITE)
    pipe1, states1 = pipeline_on(checkpoint, jax.devices()[:1])
    journal1 = stream.PartialResults.open(tmp_path / "on1.jsonl", {"run": "on1"})
    scores1 = suites.shapes_suite(pipe1, states1, progress=False, journal=journal1, **SUITE)
    items8 = _items(tmp_path / "on8.jsonl")
    assert _items(tmp_path / "on1.jsonl") == items8 and _scores(scores1) == _scores(scores8)
    assert len({item["digest"] for item in items8["t2i"].values()}) == 6  # six different images
    assert len(set(items8["captions"].values())) > 1

    out = tmp_path / "cluster"
    results = multihost.run_processes(["-m", "dual_diffusion.evaluate", f"--checkpoint={checkpoint}",
                                       f"--out_dir={out}", *SUITE_FLAGS], timeout=300)
    assert all(r.returncode == 0 for r in results), multihost.describe(results)
    printed = _json_output(results[0].stdout)  # gloo writes its own lines to stdout too
    assert "{" not in results[1].stdout and printed["mesh"]["devices"] == 8 and printed["mesh"]["processes"] == 2
    assert printed["mesh"]["data"] == 8 and "CPU" in printed["mesh"]["note"]
    assert _items(out / "items_shapes.jsonl") == items8 and not (out / "partial_shapes.jsonl").exists()
    written = json.loads((out / "scores.json").read_text())
    assert {k: written[k] for k in ("t2i", "captions", "vqa")} == {k: scores8[k] for k in ("t2i", "captions", "vqa")}
    assert written["throughput"]["vqa"]["items"] == 5 and written["throughput"]["vqa"]["items_per_s"] > 0


class _Crash(Exception):
    pass


def test_killed_evaluation_resumes_with_nothing_lost_or_twice(on8, tmp_path, monkeypatch):
    pipe, states = on8
    whole = suites.shapes_suite(pipe, states, progress=False, **SUITE)
    calls = []
    caption = pipe.caption

    def crash_on_second_caption_batch(*args, **kw):
        calls.append(list(kw["indices"]))
        if len(calls) == 2:
            raise _Crash
        return caption(*args, **kw)

    monkeypatch.setattr(pipe, "caption", crash_on_second_caption_batch)
    path = tmp_path / "partial_shapes.jsonl"
    with pytest.raises(_Crash):
        suites.shapes_suite(pipe, states, progress=False, journal=stream.PartialResults.open(path, {"a": 1}),
                            **SUITE)
    before = _items(path)
    assert sorted(before["t2i"]) == list(range(6)) and sorted(before["captions"]) == [0, 1, 2, 3]
    with open(path, "a") as f:
        f.write('{"part": "captions", "items": [[4, "cut sho')  # a kill while a line is written
    calls.clear()
    resumed = suites.shapes_suite(pipe, states, progress=False, journal=stream.PartialResults.open(path, {"a": 1}),
                                  **SUITE)
    assert _scores(resumed) == _scores(whole)
    assert calls == [[4, 4, 4, 4]]  # only the missing caption, padded to the batch; t2i not rerun
    assert resumed["throughput"]["captions"]["items"] == 1 and resumed["throughput"]["t2i"]["items"] == 0
    after = _items(path)
    assert {part: sorted(v) for part, v in after.items()} == {"t2i": list(range(6)), "captions": list(range(5)),
                                                              "vqa": list(range(5))}
    with pytest.raises(stream.ResumeError, match=r"other settings \(a: 1 in the file, 2 now\)"):
        stream.PartialResults.open(path, {"a": 2})


def test_evaluate_and_sample_commands_on_the_mesh(checkpoint, on8, tmp_path, capsys):
    """The mesh flags reach the pipeline (captions equal the 8-device pipeline's); a partial file of other
    settings and bad mesh sizes are one-line errors."""
    image = tmp_path / "a.png"
    from PIL import Image

    from dual_diffusion.data import shapes_eval

    im = shapes_eval.caption_eval_set(3, 1, 16).images[0]
    Image.fromarray(im).save(image)
    code = sample.main([f"--checkpoint={checkpoint}", "--task=caption", f"--image={image}", f"--image={image}",
                        "--steps=4", "--image-size=16", "--text-length=64", "--mesh_data=2", "--mesh_fsdp=4",
                        "--seed=5"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and (printed["mesh"]["data"], printed["mesh"]["fsdp"]) == (2, 4)
    pipe, states = on8
    want = pipe.caption(states, np.stack([im, im]), seed=5, opts=TextOptions(steps=4))
    assert [c["text"] for c in printed["captions"]] == want

    out = tmp_path / "eval"
    out.mkdir()
    (out / "partial_shapes.jsonl").write_text(json.dumps({"settings": {"suite": "shapes"}}) + "\n"
                                              + json.dumps({"part": "t2i", "items": [[0, {"pass": True}]]}) + "\n")
    for flags, message in [([f"--out_dir={out}"], "partial_shapes.jsonl holds results made with other settings"),
                           (["--mesh_data=3"], "--mesh_data=3: expected a divisor of the 8 devices")]:
        assert evaluate.main([f"--checkpoint={checkpoint}", *SUITE_FLAGS, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_dry_run_compiles_sampling_for_a_tpu_slice(checkpoint, libtpu, capsys):
    """`sample --dry_run --topology=v5e-8`: the caption call compiled for 8 v5e chips, FSDP weights, memory per
    chip against its HBM, FLOPs per call as flops.py counts them, and the layout `sample` would pick."""
    from dual_diffusion import flops
    from dual_diffusion.checkpoints.pretrained import read_configs

    with jax.default_matmul_precision("default"):  # as the command runs (conftest asks for "highest", which
        # Mosaic refuses for the bfloat16 matmuls of the splash kernel)
        assert sample.main(["--dry_run", "--topology=v5e-8", "--task=caption", f"--checkpoint={checkpoint}",
                            "--image-size=16", "--text-length=64", "--steps=4", "--batch-size=5",
                            "--mesh_fsdp=8"]) == 0
    out = capsys.readouterr().out
    report = _json_output(out)
    assert (report["chips"], report["device_kind"], report["dtype"]) == (8, "TPU v5 lite", "bfloat16")
    (layout,) = report["layouts"]
    assert layout["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} == {k: report["default_mesh"][k] for k in
                                                                     ("data", "fsdp", "tensor")}
    assert report["weights_bytes"] > 2 * layout["weights_per_chip"] > 0  # the weights are sharded
    cfg = read_configs(checkpoint)
    want = flops.image_to_text(cfg["transformer"], cfg["text_encoder"], 8, 8, 64, 5)  # batch 5 -> 8, 4 steps + 1
    assert layout["fits"] and layout["batch_size"] == 8 and layout["analytic_flops_per_chip"] == want // 8
    assert 0 < layout["xla_memory"]["peak"] < layout["hbm_usable_bytes"] == int(15.75 * GiB)
    assert layout["pallas_kernels"] > 0  # the MM-DiT's splash attention, as on a TPU
    assert layout["collectives"]["all-gather"]["ops"] > 0  # the FSDP weights are gathered
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}, batch 8: weights" in out and "at peak bf16" in out


def test_dry_run_that_fits_nowhere_is_one_error_line(checkpoint, libtpu, monkeypatch, capsys):
    """Each layout reports what it needs; when none fits, one `error:` line."""
    from dual_diffusion.aot import compile_report, inference_report

    def out_of_memory(task, configs, runtime, devices, info, sizes, *args):
        error = compile_report.DoesNotFit(40 * GiB, info.chip.hbm_usable_bytes, "Ran out of memory in hbm")
        error.report = dict(mesh=dict(zip(("data", "fsdp", "tensor"), sizes)), batch_size=8, weights_per_chip=1,
                            fits=False, needed_bytes=error.needed)
        raise error

    monkeypatch.setattr(inference_report, "compile_layout", out_of_memory)
    argv = ["--dry_run", "--topology=v5e-8", "--task=t2i", f"--checkpoint={checkpoint}", "--image-size=16"]
    assert sample.main(argv) == 2
    out, err = capsys.readouterr()
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}, batch 8: weights" in out  # without mesh flags: both layouts
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}, batch 8: weights" in out and out.count("does not fit") == 2
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: t2i does not fit v5e-8 (15.75 GiB usable per chip)")
    assert "needs 40.00 GiB" in err and "--batch-size" in err
    for bad, message in [(["--task=inpaint"], "not inpaint"), (["--topology=v5e-3"], "unknown TPU slice"),
                         (["--mesh_data=3"], "--mesh_data=3")]:
        assert sample.main(argv + bad) == 2
        assert message in capsys.readouterr().err
    assert sample.main(["--topology=v5e-8", "--task=t2i"]) == 2
    assert "--dry_run and --topology=NAME" in capsys.readouterr().err
