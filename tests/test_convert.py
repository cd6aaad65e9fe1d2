"""tools/convert_sd3_weights.py + load_pretrained against tiny PyTorch references (diffusers layout).

One tiny D-DiT folder is built and converted once (module fixture); the tests
check float32 parity of every network, the export round trip, plain-SD3
initialisation, sharded inputs and the error message of each bad input.
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

sys.path.insert(0, str(torch_refs.REPO / "tools"))
import convert_sd3_weights as cli  # noqa: E402

TOL = 1e-4  # max abs error <= TOL * max |reference|


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def run_cli(*args) -> int:
    return cli.main([*map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny D-DiT diffusers folder (root/src) and its PyTorch modules."""
    torch_refs.require_ref_ddit()
    root = tmp_path_factory.mktemp("ddit")
    refs = torch_refs.make_diffusers_folder(root / "src")
    return root, refs


@pytest.fixture(scope="module")
def converted(source):
    """The same folder converted with the CLI into root/dst."""
    root, refs = source
    assert run_cli("--src", root / "src", "--dst", root / "dst") == 0
    return root, refs


def transformer_inputs(seed=0, b=2, hw=8, length=5):
    g = np.random.default_rng(seed)
    latents = g.standard_normal((b, hw, hw, 4)).astype(np.float32)
    text = g.standard_normal((b, length, 32)).astype(np.float32)
    return latents, text, np.array([10.0, 700.0][:b], np.float32)


def torch_transformer(model, latents, text, timestep):
    import torch

    ref = torch_refs.require_ref_ddit()
    with torch.no_grad():
        lat = None if latents is None else torch.tensor(latents).permute(0, 3, 1, 2)
        v, logits = ref.ddit_forward(model, lat, torch.tensor(text), torch.tensor(timestep))
    return (None if v is None else v.permute(0, 2, 3, 1).numpy()), logits.numpy()


def check_transformer(bundle, model, errors: dict, tag: str = ""):
    latents, text, t = transformer_inputs()
    v_ref, l_ref = torch_transformer(model, latents, text, t)
    v, logits = bundle.transformer(latents, text, t)
    _, l0_ref = torch_transformer(model, None, text, t)
    v0, l0 = bundle.transformer(None, text, t)
    assert v0 is None
    errors.update({f"velocity{tag}": rel_err(v, v_ref), f"logits{tag}": rel_err(logits, l_ref),
                   f"logits_text_only{tag}": rel_err(l0, l0_ref)})


@pytest.mark.slow
def test_parity_all_networks(converted):
    import torch

    root, refs = converted
    bundle = dual_diffusion.load_pretrained(root / "dst")
    errors = {}
    check_transformer(bundle, refs["modules"]["transformer"], errors)

    ids = np.asarray(bundle.tokenizer.encode_batch(["a cat on a sofa", "snow"], length=8), np.int32)
    with torch.no_grad():
        h_ref = refs["modules"]["text_encoder_3"](input_ids=torch.tensor(ids, dtype=torch.long)).last_hidden_state
    errors["t5_hidden"] = rel_err(bundle.text_encoder(ids), h_ref.numpy())

    g = np.random.default_rng(1)
    images = g.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    latents = g.standard_normal((2, 8, 8, 4)).astype(np.float32)
    vae = refs["modules"]["vae"]
    with torch.no_grad():
        mean_ref = vae.encode(torch.tensor(images).permute(0, 3, 1, 2)).latent_dist.mean.permute(0, 2, 3, 1)
        dec_ref = vae.decode(torch.tensor(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)
    errors["vae_mean"] = rel_err(bundle.vae.encode(images), mean_ref.numpy())
    errors["vae_decode"] = rel_err(bundle.vae.decode(latents), dec_ref.numpy())
    assert (bundle.vae.shift_factor, bundle.vae.scaling_factor) == (0.0609, 1.5305)
    print("parity (max abs err / max |ref|):", json.dumps(errors))
    assert max(errors.values()) <= TOL, errors

    # Sharded restore on the 8-device CPU mesh gives the same numbers.
    from dual_diffusion.sharding import make_mesh

    sharded = dual_diffusion.load_pretrained(root / "dst", mesh=make_mesh(fsdp=4, tensor=2),
                                             components=("transformer",))
    kernel = sharded.states["transformer"]["text_out_proj"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8
    latents, text, t = transformer_inputs()
    np.testing.assert_allclose(sharded.transformer(latents, text, t)[1], bundle.transformer(latents, text, t)[1],
                               rtol=1e-5, atol=1e-5)


def safetensors_contents(folder: Path) -> dict:
    """{key: (dtype name, shape, raw bytes)} over a file or the shards of an index."""
    from dual_diffusion.convert.safetensors_io import TensorSource

    stem = "model" if folder.name == "text_encoder_3" else "diffusion_pytorch_model"
    src = TensorSource.from_folder(folder, stem)
    return {k: (np.dtype(src.dtype(k)).name, src.shape(k), np.asarray(src[k]).tobytes()) for k in src}


def test_export_round_trip_bit_exact(converted, tmp_path):
    from dual_diffusion.convert.safetensors_io import TensorSource, save_file
    import ml_dtypes

    root, _ = converted
    assert run_cli("--to-diffusers", "--src", root / "dst", "--dst", tmp_path / "out") == 0
    for sub in ("transformer", "text_encoder_3", "vae"):
        assert safetensors_contents(tmp_path / "out" / sub) == safetensors_contents(root / "src" / sub), sub
    assert (tmp_path / "out" / "tokenizer_3" / "spiece.model").read_bytes() == \
        (root / "src" / "tokenizer_3" / "spiece.model").read_bytes()
    assert {"transformer", "vae", "text_encoder_3", "tokenizer_3"} <= set(json.loads(
        (tmp_path / "out" / "model_index.json").read_text()))
    # PyTorch colleagues load it with the libraries' own loaders (configs included).
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    for cls, sub in ((T5EncoderModel, "text_encoder_3"), (AutoencoderKL, "vae")):
        _, loading = cls.from_pretrained(tmp_path / "out" / sub, output_loading_info=True)
        assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (sub, loading)

    # A bf16 source kept as bf16 round-trips exactly too (here with a sharded export).
    bf16 = tmp_path / "bf16"
    shutil.copytree(root / "src", bf16)
    weights = bf16 / "transformer" / "diffusion_pytorch_model.safetensors"
    src = TensorSource.from_folder(weights.parent, "diffusion_pytorch_model")
    save_file(weights, {k: np.asarray(src[k]).astype(ml_dtypes.bfloat16) for k in src})
    # Converting needs no PyTorch: run the CLI where torch / diffusers / transformers cannot be imported.
    blocked = ("import sys; [sys.modules.__setitem__(m, None) for m in ('torch', 'diffusers', 'transformers')]; "
               f"sys.path.insert(0, {str(torch_refs.REPO / 'tools')!r}); import convert_sd3_weights as c; "
               f"sys.exit(c.main(['--src', {str(bf16)!r}, '--dst', {str(tmp_path / 'bf16_dst')!r}, '--no-progress']))")
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert run_cli("--to-diffusers", "--src", tmp_path / "bf16_dst", "--dst", tmp_path / "bf16_out",
                   "--max-shard-gb", 2e-6) == 0
    assert (tmp_path / "bf16_out" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for sub in ("transformer", "text_encoder_3", "vae"):
        assert safetensors_contents(tmp_path / "bf16_out" / sub) == safetensors_contents(bf16 / sub), sub
    # Loading casts the stored bf16 to the runtime's float32 parameters, exactly.
    state = dual_diffusion.load_pretrained(tmp_path / "bf16_dst", components=("transformer",)).states["transformer"]
    kernel = state["context_embedder"]["kernel"][...]
    assert kernel.dtype == np.float32
    stored = TensorSource.from_folder(weights.parent, "diffusion_pytorch_model")["context_embedder.weight"]
    assert stored.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(stored).astype(np.float32).T)


@pytest.mark.slow
def test_qk_norm_dual_attention_sharded_parity(converted, tmp_path):
    root, refs = converted
    src = tmp_path / "src"
    shutil.copytree(root / "src", src, ignore=shutil.ignore_patterns("transformer"))
    model = torch_refs.make_transformer("ddit", refs["vocab_size"], seed=5, qk_norm="rms_norm",
                                        dual_attention_layers=(0, 2))
    torch_refs.save_transformer(model, src / "transformer", max_shard_size="20KB")
    assert (src / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert run_cli("--src", src, "--dst", tmp_path / "dst") == 0
    bundle = dual_diffusion.load_pretrained(tmp_path / "dst", components=("transformer",))
    errors = {}
    check_transformer(bundle, model, errors, "_qk_dual")
    print("parity qk-norm + dual attention:", json.dumps(errors))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.slow
def test_plain_sd3_becomes_ddit_init(converted, tmp_path, capsys):
    from dual_diffusion.convert.mmdit_keys import sd3_init_plan
    from dual_diffusion.convert.safetensors_io import TensorSource

    root, refs = converted
    src = tmp_path / "src"
    shutil.copytree(root / "src", src, ignore=shutil.ignore_patterns("transformer"))
    model = torch_refs.make_transformer("sd3", refs["vocab_size"], seed=7)
    torch_refs.save_transformer(model, src / "transformer", max_shard_size="20KB")
    capsys.readouterr()
    assert run_cli("--src", src, "--dst", tmp_path / "dst") == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "dst" / "dual_diffusion.json").read_text())["components"]["transformer"]
    bundle = dual_diffusion.load_pretrained(tmp_path / "dst", components=("transformer",))
    cfg = bundle.configs["transformer"]
    assert cfg.vocab_size == refs["vocab_size"]
    source = TensorSource.from_folder(src / "transformer", "diffusion_pytorch_model")
    _, new, dropped = sd3_init_plan(cfg, list(source))
    names = [".".join(map(str, p)) for p in new]
    assert record["new_params"] == names and record["dropped_sources"] == dropped
    assert "text_out_proj.kernel" in names and "null_image_embd" in names
    for name in names:
        assert f"new      {name}" in printed
    # The image head comes from SD3's proj_out, the image path is untouched.
    state = bundle.states["transformer"]
    np.testing.assert_array_equal(np.asarray(state["image_out_proj"]["kernel"][...]),
                                  np.asarray(source["proj_out.weight"]).T)
    latents, text, t = transformer_inputs()
    velocity, logits = bundle.transformer(latents, text, t)
    assert np.isfinite(velocity).all() and logits.shape == (2, 5, refs["vocab_size"])


def _set_header_dtype(path: Path, key: str, dtype: str) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[key]["dtype"] = dtype
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n:])


def _edit_transformer(src: Path, edit) -> None:
    from dual_diffusion.convert.safetensors_io import TensorSource, save_file

    path = src / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = dict(TensorSource.from_folder(path.parent, "diffusion_pytorch_model"))
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors)
    save_file(path, tensors)


class Payload:
    """An arbitrary object: unpickling it would run code from the file, so weights_only must refuse it."""

    def __init__(self, d):
        self.d = d


def _pickled_pth(path: Path, d: int) -> None:
    import torch

    torch.save(Payload(d), path)


BAD_INPUTS = {
    "missing_folder": (lambda s, m: shutil.rmtree(s), "does not exist"),
    "missing_transformer": (lambda s, m: shutil.rmtree(s / "transformer"), "missing the transformer/ folder"),
    "truncated": (lambda s, m: (lambda p: p.write_bytes(p.read_bytes()[:-100]))(
        s / "vae" / "diffusion_pytorch_model.safetensors"), "truncated"),
    "unknown_dtype": (lambda s, m: _set_header_dtype(s / "text_encoder_3" / "model.safetensors",
                                                     "shared.weight", "Q7"), "unknown dtype 'Q7'"),
    "missing_key": (lambda s, m: _edit_transformer(s, lambda t: t.pop("context_embedder.bias")),
                    "missing key(s) ['context_embedder.bias']"),
    "unexpected_key": (lambda s, m: _edit_transformer(s, lambda t: t.update(extra_head=np.zeros(3, np.float32))),
                       "unexpected key(s) ['extra_head']"),
    "misshaped": (lambda s, m: _edit_transformer(s, lambda t: t.update(
        {"context_embedder.bias": np.zeros(31, np.float32)})), "'context_embedder.bias' has shape [31]"),
    "mask_shape": (lambda s, m: np.save(m.with_suffix(".npy"), np.zeros((2, 32), np.float32)),
                   "shape [2, 32]; expected [32] or [1, 32]"),
    "pickled_pth": (lambda s, m: _pickled_pth(m.with_suffix(".pth"), 32), "weights_only=True"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_errors(source, tmp_path, capsys, case):
    root, _ = source
    src = tmp_path / "src"
    shutil.copytree(root / "src", src)
    mask = tmp_path / "mask"
    damage, message = BAD_INPUTS[case]
    damage(src, mask)
    extra = []
    for suffix in (".npy", ".pth"):
        if mask.with_suffix(suffix).exists():
            extra = ["--mask-embedding", mask.with_suffix(suffix)]
    capsys.readouterr()
    assert run_cli("--src", src, "--dst", tmp_path / "dst", *extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "dst" / "dual_diffusion.json").exists()


def test_mask_embedding_replaces_row(source, tmp_path, monkeypatch):
    import torch

    from dual_diffusion.convert import components

    monkeypatch.setattr(components, "GROUP_BYTES", 4096)  # many small Orbax groups per component
    root, refs = source
    d = torch_refs.TINY_T5["d_model"]
    row = np.random.default_rng(3).standard_normal(d).astype(np.float32)
    torch.save(torch.tensor(row)[None], tmp_path / "mask.pth")  # weights-only loadable: accepted
    assert run_cli("--src", root / "src", "--dst", tmp_path / "dst", "--mask-embedding", tmp_path / "mask.pth") == 0
    bundle = dual_diffusion.load_pretrained(tmp_path / "dst", components=("text_encoder",))
    table = np.asarray(bundle.states["text_encoder"]["embedding"][...])
    ref = refs["modules"]["text_encoder_3"].shared.weight.detach().numpy()
    mask_id = bundle.tokenizer.mask_id
    np.testing.assert_array_equal(table[mask_id], row)
    np.testing.assert_array_equal(np.delete(table, mask_id, 0), np.delete(ref, mask_id, 0))
    assert len(list((tmp_path / "dst" / "params" / "text_encoder").glob("0*"))) > 3


def test_load_pretrained_names_unknown_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        dual_diffusion.load_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match=f"{tmp_path} is none of the known sources"):
        dual_diffusion.load_pretrained(tmp_path)
