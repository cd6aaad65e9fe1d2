"""dual_diffusion.convert.safetensors_io against the reference `safetensors` package, and its errors."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from dual_diffusion.convert.safetensors_io import SafetensorsError, SafetensorsFile, TensorSource, save_file

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")


def reference_tensors():
    g = torch.Generator().manual_seed(0)
    return {"w.bf16": torch.randn(3, 5, generator=g).bfloat16(), "w.f16": torch.randn(7, generator=g).half(),
            "w.f32": torch.randn(2, 2, 2, generator=g), "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
            "empty": torch.zeros(0, 4)}


def as_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def test_reads_reference_files_and_writes_readable_ones(tmp_path):
    tensors = reference_tensors()
    st.save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "ref.safetensors")
    assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"format": "pt"}
    for key, t in tensors.items():
        ours = f.get(key)
        assert ours.dtype == as_numpy(t).dtype and ours.shape == tuple(t.shape), key
        assert np.asarray(ours).tobytes() == as_numpy(t).tobytes(), key
    assert f.dtype("w.bf16") == np.dtype(ml_dtypes.bfloat16)

    save_file(tmp_path / "ours.safetensors", {k: f.get(k) for k in f.keys()}, metadata={"format": "pt"})
    back = st.load_file(tmp_path / "ours.safetensors")
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key


def test_sharded_index(tmp_path):
    tensors = reference_tensors()
    keys = sorted(tensors)
    st.save_file({k: tensors[k] for k in keys[:2]}, tmp_path / "m-00001-of-00002.safetensors")
    st.save_file({k: tensors[k] for k in keys[2:]}, tmp_path / "m-00002-of-00002.safetensors")
    weight_map = {k: f"m-0000{1 + (i >= 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = TensorSource.from_folder(tmp_path, "m")
    assert sorted(source) == keys
    for key in keys:
        assert np.asarray(source[key]).tobytes() == as_numpy(tensors[key]).tobytes()

    weight_map[keys[0]] = "m-00002-of-00002.safetensors"  # index says a shard holds a tensor it lacks
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SafetensorsError, match=f"lists '{keys[0]}' in m-00002-of-00002.safetensors"):
        TensorSource.from_folder(tmp_path, "m")
    with pytest.raises(SafetensorsError, match="neither x.safetensors nor x.safetensors.index.json"):
        TensorSource.from_folder(tmp_path, "x")


def _corrupt(path, how):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if how == "tiny":
        path.write_bytes(raw[:5])
    elif how == "header_length":
        path.write_bytes((len(raw) * 2).to_bytes(8, "little") + raw[8:])
    elif how == "data":
        path.write_bytes(raw[:-8])
    elif how == "json":
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    elif how == "dtype":
        header = raw[8:8 + n].replace(b'"F32"', b'"X32"')
        path.write_bytes(raw[:8] + header + raw[8 + n:])


@pytest.mark.parametrize("how,message", [
    ("tiny", "truncated safetensors file"), ("header_length", "does not fit the file size"),
    ("data", "truncated file: tensor"), ("json", "header is not valid JSON"), ("dtype", "unknown dtype 'X32'"),
])
def test_errors_name_the_problem(tmp_path, how, message):
    path = tmp_path / "a.safetensors"
    st.save_file({"a": torch.ones(4), "b": torch.ones(3, dtype=torch.float16)}, path)
    _corrupt(path, how)
    with pytest.raises(SafetensorsError, match=message) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)
    with pytest.raises(SafetensorsError, match="no such safetensors file"):
        SafetensorsFile(tmp_path / "missing.safetensors")
