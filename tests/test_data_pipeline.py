"""The dual grain pipeline: determinism, exact resume, process shards, bad data, every source."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from dual_diffusion.data import pipeline
from dual_diffusion.data.shapes import shapes_captions_corpus
from dual_diffusion.tokenizer import Tokenizer, train_sentencepiece

N = 12  # records of the JSON source; record i is a solid image with red = 20 i


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = shapes_captions_corpus(0, 60) + [f"photo number {i}" for i in range(N)]
    return Tokenizer(train_sentencepiece(texts, tmp_path_factory.mktemp("spm") / "sp", 200))


def _png(red, size=(10, 8), mode="RGB"):
    buf = io.BytesIO()
    Image.new("RGB", size, (red, 0, 0)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _json_source(root, n=N, extra=()):
    root.mkdir(exist_ok=True)
    meta = []
    for i in range(n):
        (root / f"{i}.png").write_bytes(_png(20 * i))
        meta.append({"image_path": f"{i}.png", "caption": f"photo number {i}", "re_caption": f"a red square {i}"})
    meta += list(extra)
    (root / "meta.json").write_text(json.dumps(meta))
    return str(root / "meta.json")


def _ids(images):
    """Record index of each solid image in a batch (red channel = 20 i)."""
    return [int(round((float(im[0, 0, 0]) + 1) * 127.5 / 20)) for im in images]


def _config(t2i, i2t, **kw):
    cfg = pipeline.default_data_config()
    cfg.t2i_sources, cfg.i2t_sources = t2i, i2t
    cfg.image_size, cfg.text_length = 8, 24
    cfg.read_threads, cfg.read_prefetch = 1, 4
    cfg.update(kw)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[s][k], y[s][k]) for x, y in zip(a, b) for s in ("t2i", "i2t") for k in x[s])


def test_batch_layout_and_determinism(tmp_path, tok):
    meta = _json_source(tmp_path / "j")
    cfg = _config([{"kind": "json", "path": meta}], [{"kind": "shapes", "seed": 3, "num_records": 50}])
    a = _take(pipeline.make_dual_iterator(cfg, tok, global_batch_size=4), 3)
    b = _take(pipeline.make_dual_iterator(cfg, tok, global_batch_size=4), 3)
    c = _take(pipeline.make_dual_iterator(cfg, tok, global_batch_size=4, seed=99), 3)
    assert _same(a, b) and not _same(a, c)
    batch = a[0]
    assert batch["t2i"]["image"].shape == (4, 8, 8, 3) and batch["t2i"]["image"].dtype == np.float32
    assert batch["t2i"]["text_ids"].shape == (4, 24) and batch["t2i"]["text_ids"].dtype == np.int32
    assert set(batch["i2t"]) == {"image", "text_ids", "label_mask", "fixed_mask"}
    assert batch["i2t"]["label_mask"].dtype == bool and batch["i2t"]["fixed_mask"].shape == (4, 24)
    for b_ in a:
        assert b_["t2i"]["image"].min() >= -1 and b_["t2i"]["image"].max() <= 1
    assert int(batch["stats"]["skipped"]) == 0
    caption = tok.decode(batch["t2i"]["text_ids"][0])
    assert caption.startswith("a red square")  # the recaption by default
    assert (batch["t2i"]["text_ids"][0][len(tok.encode(caption)) - 1:] == tok.eos_id).all()  # EOS padding


def test_resume_yields_the_same_samples(tmp_path, tok):
    meta = _json_source(tmp_path / "j")
    cfg = _config([{"kind": "json", "path": meta, "weight": 2}, {"kind": "shapes", "seed": 1, "num_records": 30}],
                  [{"kind": "shapes", "seed": 2, "num_records": 40}], original_caption_prob=0.5)
    it = pipeline.make_dual_iterator(cfg, tok, global_batch_size=3)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = _take(it, 6)
    resumed = pipeline.make_dual_iterator(cfg, tok, global_batch_size=3)
    resumed.set_state(state)
    assert _same(_take(resumed, 6), expected)


def test_process_shards_are_disjoint_and_cover(tmp_path, tok):
    meta = _json_source(tmp_path / "j")
    cfg = _config([{"kind": "json", "path": meta}], [{"kind": "json", "path": meta}])
    seen = []
    for p in range(3):
        it = pipeline.make_dual_iterator(cfg, tok, global_batch_size=6, process_index=p, process_count=3)
        # b = 2 per process, 2 steps = one epoch of the process's 4 records.
        ids = [i for b in _take(it, 2) for i in _ids(b["t2i"]["image"])]
        assert len(set(ids)) == 4
        seen.append(set(ids))
    assert set().union(*seen) == set(range(N)) and sum(map(len, seen)) == N


def test_processes_draw_their_own_randomness(tmp_path, tok):
    """Each process's i-th example makes its own random choices (here: original caption or recaption): a seed
    shared by all processes would repeat them across the pod."""
    meta = _json_source(tmp_path / "j")
    cfg = _config([{"kind": "json", "path": meta}], [{"kind": "json", "path": meta}], original_caption_prob=0.5)

    def originals(p):
        it = pipeline.make_dual_iterator(cfg, tok, global_batch_size=4, process_index=p, process_count=2)
        return [tok.decode(ids).startswith("photo") for b in _take(it, 6) for ids in b["t2i"]["text_ids"]]

    shares = [originals(p) for p in range(2)]
    assert 0 < sum(shares[0]) < 12 and 0 < sum(shares[1]) < 12
    assert shares[0] != shares[1]


def test_epochs_are_reshuffled(tmp_path, tok):
    meta = _json_source(tmp_path / "j")
    cfg = _config([{"kind": "json", "path": meta}], [{"kind": "json", "path": meta}])
    ids = [i for b in _take(pipeline.make_dual_iterator(cfg, tok, global_batch_size=4), 6)
           for i in _ids(b["t2i"]["image"])]
    first, second = ids[:N], ids[N:]
    assert sorted(first) == sorted(second) == list(range(N)) and first != second


def test_mixing_weights(tmp_path, tok):
    meta = _json_source(tmp_path / "j")
    cfg = _config([{"kind": "json", "path": meta, "weight": 3}, {"kind": "shapes", "seed": 0, "weight": 1}],
                  [{"kind": "shapes", "seed": 1}])
    images = np.concatenate([b["t2i"]["image"] for b in _take(pipeline.make_dual_iterator(
        cfg, tok, global_batch_size=8), 8)])
    from_json = (np.abs(images[:, :, :, 1:] + 1) < 1e-6).all(axis=(1, 2, 3))  # json images: green = blue = 0
    assert abs(from_json.mean() - 0.75) <= 0.1


def test_bad_records_are_skipped_and_counted(tmp_path, tok):
    root = tmp_path / "j"
    root.mkdir()
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    (root / "gray.png").write_bytes(_png(100, mode="L"))
    (root / "rgba.png").write_bytes(_png(100, mode="RGBA"))
    bad = [{"image_path": "missing.png", "caption": "x"}, {"image_path": "corrupt.png", "caption": "x"},
           {"image_path": "0.png", "caption": "", "re_caption": " "}]
    converted = [{"image_path": "gray.png", "caption": "gray"}, {"image_path": "rgba.png", "caption": "rgba"}]
    meta = _json_source(root, n=6, extra=bad + converted)
    cfg = _config([{"kind": "json", "path": meta}], [{"kind": "shapes", "seed": 0}])
    # 11 records, 8 good: with this seed the 3 bad ones all come before the 8th good one (a bad
    # record's count rides on the next good example, so it lands in that example's batch).
    batches = _take(pipeline.make_dual_iterator(cfg, tok, global_batch_size=1), 8)
    assert sum(int(b["stats"]["skipped"]) for b in batches) == 3
    assert sum(int(b["stats"]["skipped_t2i"]) for b in batches) == 3
    assert sum(int(b["stats"]["converted"]) for b in batches) == 2
    assert all(np.isfinite(b["t2i"]["image"]).all() for b in batches)


def test_truncation_is_counted(tmp_path, tok):
    meta = _json_source(tmp_path / "j")
    cfg = _config([{"kind": "json", "path": meta}], [{"kind": "json", "path": meta}], text_length=3)
    batch = next(pipeline.make_dual_iterator(cfg, tok, global_batch_size=4))
    assert int(batch["stats"]["truncated"]) == 8
    assert (batch["t2i"]["text_ids"][:, -1] == tok.eos_id).all()


def test_source_without_valid_record_is_an_error(tmp_path, tok):
    root = tmp_path / "dead"
    root.mkdir()
    (root / "meta.json").write_text(json.dumps([{"image_path": "nope.png", "caption": "x"}] * 3))
    cfg = _config([{"kind": "json", "path": str(root / "meta.json"), "name": "dead_source"}],
                  [{"kind": "shapes", "seed": 0}])
    with pytest.raises(ValueError, match="dead_source"):
        pipeline.make_dual_iterator(cfg, tok, global_batch_size=2)


def test_wds_tfds_llava_through_the_pipeline(tmp_path, tok):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tarfile.open(tmp_path / "s-0.tar", "w") as tar:
        for k in range(4):
            for name, data in ((f"{k}.png", _png(20 * k)), (f"{k}.txt", f"photo number {k}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    class TinyVqa(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),  # raw pixels
                "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                yield i, {"image": np.full((8, 8, 3), 20 * i, np.uint8), "caption": f"photo number {i}"}

    TinyVqa(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    (tmp_path / "0.png").write_bytes(_png(0))
    llava = [{"image": "0.png", "conversations": [{"from": "human", "value": "<image>\nhow many squares are there?"},
                                                  {"from": "gpt", "value": "two"}]}] * 3
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    cfg = _config([{"kind": "wds", "path": str(tmp_path)}, {"kind": "tfds", "path": str(tmp_path / "tfds")}],
                  [{"kind": "llava", "path": str(tmp_path / "llava.json"), "suffix": "short_answer"}], text_length=48)
    batches = _take(pipeline.make_dual_iterator(cfg, tok, global_batch_size=4), 4)
    captions = {tok.decode(ids) for b in batches for ids in b["t2i"]["text_ids"]}
    assert captions == {f"photo number {k}" for k in range(4)}
    i2t = batches[0]["i2t"]
    for row, label, fixed in zip(i2t["text_ids"], i2t["label_mask"], i2t["fixed_mask"]):
        assert tok.decode(row[label]) == "two" and row[label][-1] == tok.eos_id
        assert tok.decode(row[fixed]).startswith("Q: how many squares are there? Answer the question")
        assert not (label & fixed).any()


@pytest.mark.slow
def test_worker_processes_resume(tmp_path, tok):
    meta = _json_source(tmp_path / "j")
    cfg = _config([{"kind": "json", "path": meta}], [{"kind": "shapes", "seed": 0}], worker_count=2)
    it = pipeline.make_dual_iterator(cfg, tok, global_batch_size=2)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    it.close()
    resumed = pipeline.make_dual_iterator(cfg, tok, global_batch_size=2)
    resumed.set_state(state)
    got = _take(resumed, 4)
    resumed.close()
    assert _same(got, expected)


def test_orbax_checkpoint_round_trip(tmp_path, tok):
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = _config([{"kind": "shapes", "seed": 0}], [{"kind": "shapes", "seed": 1}])
    it = pipeline.make_dual_iterator(cfg, tok, global_batch_size=2)
    _take(it, 2)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 2)
    resumed = pipeline.make_dual_iterator(cfg, tok, global_batch_size=2)
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert _same(_take(resumed, 2), expected)


def test_caption_label_padding_option(tok):
    shapes_i2t = [{"kind": "shapes", "seed": 3, "num_records": 50}]
    kw = dict(t2i=[{"kind": "shapes", "seed": 2, "num_records": 50}], i2t=shapes_i2t)
    full = _take(pipeline.make_dual_iterator(_config(**kw), tok, global_batch_size=8), 2)
    trim = _take(pipeline.make_dual_iterator(_config(**kw, caption_label_padding=False), tok, global_batch_size=8), 2)
    n_caption = 0
    for a, b in zip(full, trim):
        ia, ib = a["i2t"], b["i2t"]
        assert np.array_equal(ia["text_ids"], ib["text_ids"]) and np.array_equal(ia["fixed_mask"], ib["fixed_mask"])
        for ids, fixed, la, lb in zip(ia["text_ids"], ia["fixed_mask"], ia["label_mask"], ib["label_mask"]):
            if fixed.any():  # VQA rows are unchanged: answer + EOS
                assert np.array_equal(la, lb)
                continue
            n_caption += 1
            first_eos = int(np.flatnonzero(ids == tok.eos_id)[0])
            assert la.all() and lb[: first_eos + 1].all() and not lb[first_eos + 1:].any()
    assert n_caption > 0


def test_release_size_filter_is_counted_as_skips(tmp_path, tok):
    """At 256 px: a 200 px image and a 5:1 panorama are dropped and counted; the 256 px and 4:1 ones stay."""
    root = tmp_path / "sizes"
    root.mkdir()
    sizes = {"small": (300, 200), "wide": (1280, 256), "square": (256, 256), "four": (1024, 256)}
    for name, size in sizes.items():
        (root / f"{name}.png").write_bytes(_png(100, size=size))
    (root / "meta.json").write_text(json.dumps([{"image_path": f"{n}.png", "caption": n} for n in sizes]))
    spec = [{"kind": "json", "path": str(root / "meta.json")}]
    cfg = _config(spec, [{"kind": "shapes", "seed": 0}], image_size=256, text_length=8)
    assert (cfg.min_image_side, cfg.max_aspect_ratio) == (256, 4.0)  # the release's filter is the default
    batches = _take(pipeline.make_dual_iterator(cfg, tok, global_batch_size=1), 6)
    kept = {tok.decode(b["t2i"]["text_ids"][0]) for b in batches}
    assert kept == {"square", "four"}
    # 6 good examples = 3 passes over the 4 records, 2 skipped per pass (the last ones may still be pending).
    assert 4 <= sum(int(b["stats"]["skipped_t2i"]) for b in batches) <= 6
    off = _config(spec, [{"kind": "shapes", "seed": 0}], image_size=256, text_length=8, min_image_side=0,
                  max_aspect_ratio=0.0)
    batches = _take(pipeline.make_dual_iterator(off, tok, global_batch_size=4), 2)
    assert {tok.decode(ids) for b in batches for ids in b["t2i"]["text_ids"]} == set(sizes)
    assert sum(int(b["stats"]["skipped"]) for b in batches) == 0


def test_tiny_images_under_the_size_filter_default(tok):
    """The side limit is capped at image_size: the demo's 32 px shapes world is never filtered."""
    cfg = _config([{"kind": "shapes", "seed": 2, "num_records": 20}], [{"kind": "shapes", "seed": 3}],
                  image_size=32, text_length=32)
    batches = _take(pipeline.make_dual_iterator(cfg, tok, global_batch_size=4), 3)
    assert sum(int(b["stats"]["skipped"]) for b in batches) == 0


def test_stage3_llava_prompts_and_label_padding(tmp_path, tok):
    """First turn only, the source's suffix, and (vqa_label_padding) the answer plus all its EOS padding labelled."""
    (tmp_path / "0.png").write_bytes(_png(0))
    conv = [{"from": "human", "value": "<image>\nhow many squares are there?"}, {"from": "gpt", "value": "two"},
            {"from": "human", "value": "what color?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "llava.json").write_text(json.dumps([{"image": "0.png", "conversations": conv}] * 3))
    spec = {"kind": "llava", "path": str(tmp_path / "llava.json")}
    prefixes = {"none": "Q: how many squares are there? A:",
                "short_answer": "Q: how many squares are there? Answer the question using a single word or phrase. A:"}
    for suffix, prefix in prefixes.items():
        cfg = _config([{"kind": "shapes", "seed": 0}], [dict(spec, suffix=suffix)], text_length=48,
                      vqa_label_padding=True)
        i2t = next(pipeline.make_dual_iterator(cfg, tok, global_batch_size=4))["i2t"]
        for row, label, fixed in zip(i2t["text_ids"], i2t["label_mask"], i2t["fixed_mask"]):
            assert tok.decode(row[fixed]) == prefix
            assert np.array_equal(label, ~fixed) and tok.decode(row[label]) == "two"
            assert (row[label][1:] == tok.eos_id).all() and label.sum() > 2
