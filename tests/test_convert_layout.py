"""Finding a source's folders by class (SD3 layout, the D-DiT release's layout, no model_index.json), the
mask-row warning and record, and the converter's --dst checks.

The release's pipeline (DualDiffSD3Pipeline) registers T5 as text_encoder/ and its tokenizer as
tokenizer/, next to transformer/ (SD3JointModelFlexible), vae/ and scheduler/; no CLIP.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dual_diffusion
import torch_refs
from dual_diffusion.convert import layout as L
from test_convert import TOL, check_transformer, rel_err, run_cli

CLI = torch_refs.REPO / "tools" / "convert_sd3_weights.py"
RELEASE_INDEX = {"_class_name": "DualDiffSD3Pipeline", "_diffusers_version": "0.30.0",
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                 "transformer": ["sd3_model", "SD3JointModelFlexible"], "vae": ["diffusers", "AutoencoderKL"]}


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def to_release_layout(sd3: Path, out: Path, vocab_size: int) -> Path:
    """The SD3-layout folder rearranged as the release ships it: T5 in text_encoder/, tokenizer/, no CLIP."""
    shutil.copytree(sd3, out, ignore=shutil.ignore_patterns("text_encoder"))  # drops only the CLIP folder
    (out / "text_encoder_3").rename(out / "text_encoder")
    (out / "tokenizer_3").rename(out / "tokenizer")
    config = json.loads((out / "transformer" / "config.json").read_text())
    write_json(out / "transformer" / "config.json", dict(config, _class_name="SD3JointModelFlexible",
                                                          vocab_size=vocab_size))
    write_json(out / "scheduler" / "scheduler_config.json",
               {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    write_json(out / "model_index.json", RELEASE_INDEX)
    return out


# ---- layout.resolve on config-only folders (no weights, no torch) ------------------------------------------

def fake_folder(root: Path, index: dict | None, classes: dict[str, str]) -> Path:
    """Subfolders with only their config files: models get config.json, tokenizers tokenizer_config.json."""
    for name, cls in classes.items():
        if "Tokenizer" in cls:
            write_json(root / name / "tokenizer_config.json", {"tokenizer_class": cls})
        elif cls.startswith("T5") or cls.startswith("CLIP"):
            write_json(root / name / "config.json", {"architectures": [cls]})
        else:
            write_json(root / name / "config.json", {"_class_name": cls})
    if index is not None:
        write_json(root / "model_index.json", {k: ["lib", v] for k, v in index.items()})
    return root


SD3_CLASSES = {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
               "text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
               "text_encoder_3": "T5EncoderModel", "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer",
               "tokenizer_3": "T5TokenizerFast"}
RELEASE_CLASSES = {"transformer": "SD3JointModelFlexible", "vae": "AutoencoderKL", "text_encoder": "T5EncoderModel",
                   "tokenizer": "T5TokenizerFast"}


@pytest.mark.parametrize("with_index", [True, False])
def test_resolve_sd3_and_release_layouts(tmp_path, with_index):
    sd3 = L.resolve(fake_folder(tmp_path / "sd3", SD3_CLASSES if with_index else None, SD3_CLASSES))
    assert sd3.folders == {"transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder_3",
                           "tokenizer": "tokenizer_3"}
    assert set(sd3.unused) == {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
    release = L.resolve(fake_folder(tmp_path / "rel", RELEASE_CLASSES if with_index else None, RELEASE_CLASSES))
    assert release.folders == {r: r for r in L.ROLES}
    assert release.classes["transformer"] == "SD3JointModelFlexible"
    line = release.describe()
    assert "transformer = transformer/ (SD3JointModelFlexible" in line
    assert ("inferred" in line) != with_index and release.found_by == ("model_index.json" if with_index else
                                                                       "config.json")
    if not with_index:
        assert release.evidence == {"transformer": "config.json _class_name", "vae": "config.json _class_name",
                                    "text_encoder": "config.json architectures",
                                    "tokenizer": "tokenizer_config.json tokenizer_class"}


def test_resolve_errors_name_folder_and_expectation(tmp_path):
    two_t5 = dict(SD3_CLASSES, text_encoder="T5EncoderModel")
    with pytest.raises(L.ConversionError) as e:
        L.resolve(fake_folder(tmp_path / "a", two_t5, two_t5))
    assert str(e.value) == (f"{tmp_path / 'a' / 'model_index.json'}: 2 candidates for the text_encoder: "
                            "text_encoder/ (T5EncoderModel), text_encoder_3/ (T5EncoderModel); expected exactly one")
    no_vae = {k: v for k, v in RELEASE_CLASSES.items() if k != "vae"}
    with pytest.raises(L.ConversionError, match=r"no model_index.json; .*: no vae \(expected AutoencoderKL\)$"):
        L.resolve(fake_folder(tmp_path / "b", None, no_vae))
    # model_index.json names text_encoder/ as T5, but the folder holds CLIP (an SD3 index over a release folder).
    clash = fake_folder(tmp_path / "c", RELEASE_CLASSES, dict(RELEASE_CLASSES, text_encoder="CLIPTextModel"))
    with pytest.raises(L.ConversionError, match="says 'CLIPTextModel', but model_index.json names it as the "
                                                r"text_encoder \(T5EncoderModel\)"):
        L.resolve(clash)
    shutil.rmtree(clash / "tokenizer")
    with pytest.raises(L.ConversionError, match=r"missing the tokenizer/ folder \(T5TokenizerFast, the tokenizer"):
        L.resolve(clash)
    assert L.role_of("CLIPTextModelWithProjection") is None and L.role_of("PixArtTransformer2DModel") == "transformer"


# ---- real conversions of tiny PyTorch networks ----------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """root/sd3 (SD3 layout, D-DiT transformer), root/release (release layout) and their PyTorch modules."""
    torch_refs.require_ref_ddit()
    root = tmp_path_factory.mktemp("layouts")
    refs = torch_refs.make_diffusers_folder(root / "sd3")
    to_release_layout(root / "sd3", root / "release", refs["vocab_size"])
    return root, refs


def states_of(path: Path) -> dict:
    from dual_diffusion.convert.components import flat_variables

    bundle = dual_diffusion.load_pretrained(path)
    return {name: {k: np.asarray(v.get_value()) for k, v in flat_variables(bundle.states[name]).items()}
            for name in ("transformer", "text_encoder", "vae")}


def test_release_layout_converts_loads_and_matches(folders, tmp_path, capsys):
    import torch

    root, refs = folders
    capsys.readouterr()
    assert run_cli("--src", root / "release", "--dst", tmp_path / "dst") == 0
    out = capsys.readouterr()
    assert ("transformer = transformer/ (SD3JointModelFlexible); text_encoder = text_encoder/ (T5EncoderModel); "
            "vae = vae/ (AutoencoderKL); tokenizer = tokenizer/ (T5TokenizerFast); "
            "not used: scheduler/ (FlowMatchEulerDiscreteScheduler)") in out.out
    assert "warning" not in out.err
    info = json.loads((tmp_path / "dst" / "dual_diffusion.json").read_text())
    assert info["layout"]["components"]["text_encoder"] == {"folder": "text_encoder", "class": "T5EncoderModel"}
    assert info["mask_embedding"]["row"] == "source" and info["model_index"] == RELEASE_INDEX

    bundle = dual_diffusion.load_pretrained(tmp_path / "dst")
    errors = {}
    check_transformer(bundle, refs["modules"]["transformer"], errors)
    ids = np.asarray(bundle.tokenizer.encode_batch(["a cat on a sofa", "snow"], length=8), np.int32)
    with torch.no_grad():
        hidden = refs["modules"]["text_encoder_3"](input_ids=torch.tensor(ids, dtype=torch.long)).last_hidden_state
    errors["t5_hidden"] = rel_err(bundle.text_encoder(ids), hidden.numpy())
    latents = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        decoded = refs["modules"]["vae"].decode(torch.tensor(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)
    errors["vae_decode"] = rel_err(bundle.vae.decode(latents), decoded.numpy())
    print("release layout parity:", json.dumps(errors))
    assert max(errors.values()) <= TOL, errors
    assert (tmp_path / "dst" / "tokenizer" / "spiece.model").read_bytes() == \
        (root / "release" / "tokenizer" / "spiece.model").read_bytes()


def test_sd3_layout_and_inferred_layout_give_the_same_checkpoint(folders, tmp_path, capsys):
    root, _ = folders
    capsys.readouterr()
    assert run_cli("--src", root / "sd3", "--dst", tmp_path / "sd3") == 0
    printed = capsys.readouterr().out
    assert "text_encoder = text_encoder_3/ (T5EncoderModel); vae = vae/ (AutoencoderKL); " \
           "tokenizer = tokenizer_3/ (T5TokenizerFast); not used: text_encoder/ (CLIPTextModel)" in printed
    info = json.loads((tmp_path / "sd3" / "dual_diffusion.json").read_text())
    assert info["layout"]["components"]["tokenizer"]["folder"] == "tokenizer_3"

    no_index = tmp_path / "no_index"
    shutil.copytree(root / "release", no_index)
    (no_index / "model_index.json").unlink()
    assert run_cli("--src", no_index, "--dst", tmp_path / "inferred") == 0
    printed = capsys.readouterr().out
    assert (f"no model_index.json in {no_index}; inferred from each subfolder's config: "
            "transformer = transformer/ (SD3JointModelFlexible, config.json _class_name); "
            "text_encoder = text_encoder/ (T5EncoderModel, config.json architectures); "
            "vae = vae/ (AutoencoderKL, config.json _class_name); tokenizer = tokenizer/ (T5Tokenizer, spiece.model)\n"
            ) in printed
    info = json.loads((tmp_path / "inferred" / "dual_diffusion.json").read_text())
    assert info["model_index"] is None and info["layout"]["found_by"] == "config.json"
    ours, theirs = states_of(tmp_path / "sd3"), states_of(tmp_path / "inferred")
    for name in ours:
        assert ours[name].keys() == theirs[name].keys()
        for key in ours[name]:
            np.testing.assert_array_equal(ours[name][key], theirs[name][key], err_msg=f"{name} {key}")


def test_plain_sd3_without_mask_embedding_warns_and_records(folders, tmp_path, capsys):
    root, refs = folders
    src = tmp_path / "src"
    shutil.copytree(root / "sd3", src, ignore=shutil.ignore_patterns("transformer"))
    torch_refs.save_transformer(torch_refs.make_transformer("sd3", refs["vocab_size"], seed=7), src / "transformer")
    capsys.readouterr()
    assert run_cli("--src", src, "--dst", tmp_path / "plain") == 0
    out = capsys.readouterr()
    warning = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "--mask-embedding" in warning[0] and "<extra_id_0>" in warning[0], out.err
    mask_id = refs["tokenizer"].mask_id
    record = json.loads((tmp_path / "plain" / "dual_diffusion.json").read_text())["mask_embedding"]
    assert record == {"row": "unaligned", "source": "text_encoder_3/ (T5's pretrained row)",
                      "token": "<extra_id_0>", "id": mask_id}
    assert f"mask token row {mask_id} (<extra_id_0>): unaligned" in out.out
    assert dual_diffusion.load_pretrained(tmp_path / "plain", components=()).info["mask_embedding"] == record

    row = np.full(torch_refs.TINY_T5["d_model"], 0.5, np.float32)
    np.save(tmp_path / "mask.npy", row)
    assert run_cli("--src", src, "--dst", tmp_path / "aligned", "--mask-embedding", tmp_path / "mask.npy") == 0
    assert "warning" not in capsys.readouterr().err
    record = json.loads((tmp_path / "aligned" / "dual_diffusion.json").read_text())["mask_embedding"]
    assert record["row"] == "replaced" and record["source"] == str(tmp_path / "mask.npy")


# ---- --dst: refused in one line before any work ------------------------------------------------------------

def _snapshot(path: Path) -> dict:
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", ["not_empty", "is_file", "export_is_file"])
def test_bad_dst_is_one_line_error(folders, tmp_path, case):
    root, _ = folders
    dst = tmp_path / "dst"
    if case == "not_empty":
        dst.mkdir()
        (dst / "notes.txt").write_text("keep me")
        expected = f"error: --dst {dst} is not empty (holds notes.txt); expected an empty or absent folder"
    else:
        dst.write_text("a file")
        expected = f"error: --dst {dst} is a file, not a folder; expected an empty or absent folder"
    args = ["--src", str(root / "sd3"), "--dst", str(dst), "--no-progress"]
    if case == "export_is_file":
        args[1] = str(tmp_path)  # refused on --dst before --src is even read
        args.append("--to-diffusers")
    before = _snapshot(dst)
    done = subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [expected], done.stderr
    assert done.stdout == ""
    assert _snapshot(dst) == before


def test_library_functions_refuse_bad_destinations(tmp_path):
    from dual_diffusion.convert.convert_to_jax import convert
    from dual_diffusion.convert.export import export_to_diffusers

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(L.ConversionError, match=r"^destination .*full is not empty \(holds x\)"):
        convert(tmp_path / "absent_src", tmp_path / "full", progress=False)
    with pytest.raises(L.ConversionError, match=r"^export destination .*file is a file, not a folder"):
        export_to_diffusers(tmp_path / "absent_src", tmp_path / "file", progress=False)
    with pytest.raises(L.ConversionError, match=r"^destination .*file/sub: .*file is a file, not a folder"):
        convert(tmp_path / "absent_src", tmp_path / "file" / "sub", progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file", "full", "x"]
