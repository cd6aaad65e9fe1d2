"""Each source type read from small files written here; transforms on known images."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from dual_diffusion.data import sources, transforms


def _png(rgb, size=(12, 10), mode="RGB"):
    img = Image.new("RGB", size, tuple(rgb)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _decode(data):
    return transforms.decode_image(data)[0]


def test_json_source(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((200, 0, 0)))
    meta = [{"path": "img/a.png", "orig": "original a", "recap": "recaption a", "width": 12},
            {"path": "img/missing.png", "orig": "b"}]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    src = sources.JsonCaptionSource(str(tmp_path / "meta.json"), image_key="path", caption_key="recap",
                                    original_key="orig")
    assert len(src) == 2
    rec = src[0]
    assert rec["caption"] == "recaption a" and rec["original_caption"] == "original a" and rec["error"] is None
    assert _decode(rec["image"])[0, 0].tolist() == [200, 0, 0]
    assert "missing.png" in src[1]["error"] and src[1]["caption"] == "b"
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    assert len(sources.JsonCaptionSource(str(tmp_path / "meta.jsonl"), image_key="path")) == 2


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_source(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tar:
            for k in range(3):
                _add(tar, f"s{s}/{k:04d}.png", _png((10 * k, 50 * s, 0)))
                if k == 2:
                    _add(tar, f"s{s}/{k:04d}.json", json.dumps({"caption": f"json {s} {k}"}).encode())
                else:
                    _add(tar, f"s{s}/{k:04d}.txt", f"txt {s} {k}".encode())
        with tarfile.open(tmp_path / f"shard-{s}.tar", "a") as tar:
            _add(tar, f"s{s}/9999.txt", b"caption without image")
    src = sources.WebDatasetSource(str(tmp_path))
    assert len(src) == 8
    recs = [src[i] for i in range(len(src))]
    good = [r for r in recs if r["error"] is None]
    assert sorted(r["caption"] for r in good) == sorted(
        [f"txt {s} {k}" for s in range(2) for k in range(2)] + [f"json {s} 2" for s in range(2)])
    assert sum("no image" in (r["error"] or "") for r in recs) == 2
    first = next(r for r in good if r["caption"] == "txt 1 1")
    assert _decode(first["image"])[0, 0].tolist() == [10, 50, 0]


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # Encoded image bytes as a string Tensor: tfds' Image feature needs TensorFlow.
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                yield i, {"image": _png((40 * i, 0, 0)), "caption": f"caption {i}"}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = sources.TfdsSource(str(tmp_path), split="train")
    assert len(src) == 4
    got = {}
    for i in range(4):
        rec = src[i]
        got[rec["caption"]] = _decode(rec["image"])[0, 0, 0]
    assert got == {f"caption {i}": 40 * i for i in range(4)}
    import pickle
    assert pickle.loads(pickle.dumps(src))[0]["caption"] == src[0]["caption"]


def test_llava_source(tmp_path):
    (tmp_path / "x.png").write_bytes(_png((0, 0, 255)))
    convs = [{"id": "1", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "Blue"},
        {"from": "human", "value": "Is it round?"}, {"from": "gpt", "value": "No"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(convs))
    src = sources.LlavaSource(str(tmp_path / "llava.json"), turns="all", suffix="short_answer")
    assert len(src) == 3
    assert (src[0]["question"], src[0]["answer"]) == ("What color is it?", "Blue")
    assert (src[1]["question"], src[1]["answer"]) == ("Is it round?", "No")
    assert src[0]["caption"] == "" and src[0]["error"] is None
    assert "no image" in src[2]["error"]
    assert {src[i]["prompt_suffix"] for i in range(3)} == {"short_answer"}
    # The release's default: the first turn of each conversation only, no suffix.
    first = sources.LlavaSource(str(tmp_path / "llava.json"))
    assert len(first) == 2 and (first[0]["question"], first[0]["answer"]) == ("What color is it?", "Blue")
    assert "no image" in first[1]["error"] and first[0]["prompt_suffix"] == "none"
    with pytest.raises(ValueError, match="turns='second'"):
        sources.LlavaSource(str(tmp_path / "llava.json"), turns="second")
    with pytest.raises(ValueError, match="suffix='short'"):
        sources.build_source({"kind": "llava", "path": str(tmp_path / "llava.json"), "suffix": "short"},
                             image_size=8, stream="i2t")


def test_shapes_source_tasks():
    t2i = sources.ShapesSource(seed=0, num_records=50, image_size=32, stream="t2i")
    i2t = sources.ShapesSource(seed=0, num_records=50, image_size=32, tasks=("caption", "vqa"))
    assert all(t2i[i]["question"] is None for i in range(50))
    kinds = [i2t[i]["question"] is None for i in range(50)]
    assert 10 < sum(kinds) < 40
    assert i2t[3]["image"].shape == (32, 32, 3)
    only_vqa = sources.ShapesSource(seed=0, num_records=5, tasks=("vqa",))
    assert all(only_vqa[i]["answer"] for i in range(5))
    with pytest.raises(ValueError, match="tasks"):
        sources.ShapesSource(tasks=("dance",))


def test_build_source_errors():
    with pytest.raises(ValueError, match="kind 'csv' unknown"):
        sources.build_source({"kind": "csv", "path": "x"}, image_size=8, stream="t2i")
    with pytest.raises(ValueError, match="needs a 'path'"):
        sources.build_source({"kind": "json"}, image_size=8, stream="t2i")


def test_decode_converts_and_rejects():
    img, converted = transforms.decode_image(_png((90, 90, 90), mode="L"))
    assert converted and img.shape == (10, 12, 3) and img[0, 0].tolist() == [90, 90, 90]
    img, converted = transforms.decode_image(_png((10, 20, 30), mode="RGBA"))
    assert converted and img[0, 0].tolist() == [10, 20, 30]
    assert transforms.decode_image(np.zeros((4, 4), np.uint8))[1]
    for bad in (b"not an image", _png((1, 2, 3))[:40], None, np.zeros((4, 4, 3), np.float32)):
        with pytest.raises(transforms.BadRecord):
            transforms.decode_image(bad)


def test_resize_center_crop_and_antialias():
    # 64 wide x 32 high: left/right quarters red, middle half blue -> the 32x32 centre is all blue.
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :16] = img[:, 48:] = (255, 0, 0)
    img[:, 16:48] = (0, 0, 255)
    out = transforms.resize_center_crop(img, 16)
    assert out.shape == (16, 16, 3)
    assert (out[:, 1:-1, 2] > 240).all() and (out[:, 1:-1, 0] < 15).all()
    # A 1-px checkerboard downscaled 8x averages to gray when antialiased (aliasing gives 0 or 255).
    checker = ((np.indices((128, 128)).sum(0) % 2) * 255).astype(np.uint8)
    small = transforms.resize_center_crop(np.repeat(checker[:, :, None], 3, 2), 16)
    assert np.abs(small.astype(float) - 127.5).max() < 10
    norm = transforms.normalize(np.array([[[0, 255, 128]]], np.uint8))
    np.testing.assert_allclose(norm, [[[-1.0, 1.0, 128 / 127.5 - 1]]], atol=1e-6)


def test_size_filter_of_the_release():
    """Shorter side under min_side or long/short over max_aspect: a bad record, judged before decoding."""
    for size, ok in (((300, 256), True), ((300, 255), False), ((1024, 256), True), ((1025, 256), False)):
        data = _png((1, 2, 3), size=size)
        if ok:
            assert transforms.decode_image(data, size_hint=64, min_side=256, max_aspect=4.0)[0].shape[2] == 3
        else:
            with pytest.raises(transforms.BadRecord, match="min_image_side 256|max_aspect_ratio 4"):
                transforms.decode_image(data, size_hint=64, min_side=256, max_aspect=4.0)
    assert transforms.decode_image(_png((1, 2, 3), size=(40, 2)))[0].shape == (2, 40, 3)  # 0 disables
    with pytest.raises(transforms.BadRecord, match="aspect ratio 5.00"):
        transforms.decode_image(np.zeros((2, 10, 3), np.uint8), max_aspect=4.0)
