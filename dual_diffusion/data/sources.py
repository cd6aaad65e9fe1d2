"""Random-access sources (grain `RandomAccessDataSource`: `__len__`, `__getitem__`).

Every source returns *raw* records, never raising on bad data (the transforms
decide what is usable and the pipeline counts what is skipped):
  {"source": name, "image": bytes | uint8 array | None, "image_ref": str,
   "error": str | None, "caption": str, "original_caption": str | None,
   "question": str | None, "answer": str | None, "prompt_suffix": str}
A record with a question is a VQA record; otherwise it is a caption record.
`prompt_suffix` names the VQA prompt's suffix (text_layout.PROMPT_SUFFIXES), an
option of each VQA source: the release appends its short-answer instruction to the
short-answer VQA sets only (configs/stage3.py lists its choice per data set).
Sources are picklable (grain's worker processes receive them); file handles and
TFDS readers are opened lazily in each process.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from dual_diffusion.data import shapes
from dual_diffusion.data.text_layout import PROMPT_SUFFIXES

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def _record(source: str, **fields) -> dict:
    out = {"source": source, "image": None, "image_ref": "", "error": None, "caption": "",
           "original_caption": None, "question": None, "answer": None, "prompt_suffix": "short_answer"}
    out.update(fields)
    return out


def _read_file(path: str) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as e:
        return None, f"unreadable image {path}: {e.__class__.__name__}"


def _check_suffix(source: str, suffix: str) -> str:
    if suffix not in PROMPT_SUFFIXES:
        raise ValueError(f"source {source}: suffix={suffix!r}; expected one of {sorted(PROMPT_SUFFIXES)}")
    return suffix


def _load_json_list(path: str) -> list:
    """A JSON list, or JSON lines (one object per line)."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class JsonCaptionSource:
    """The release's metadata list: [{image_path, caption, re_caption, ...}].

    `caption_key` names the caption used by default (the recaption);
    `original_key` the original caption, chosen with `original_caption_prob`
    by the transform. Relative image paths resolve against `image_root`
    (default: the JSON file's folder).
    """

    def __init__(self, path: str, image_root: str | None = None, image_key: str = "image_path",
                 caption_key: str = "re_caption", original_key: str = "caption", name: str | None = None):
        self.name = name or f"json:{path}"
        self._items = _load_json_list(path)
        self._root = image_root or os.path.dirname(os.path.abspath(path))
        self._keys = (image_key, caption_key, original_key)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        item = self._items[index]
        image_key, caption_key, original_key = self._keys
        if not isinstance(item, dict) or image_key not in item:
            return _record(self.name, error=f"record {index} has no {image_key!r}")
        path = os.path.join(self._root, str(item[image_key]))
        data, error = _read_file(path)
        recaption, original = item.get(caption_key), item.get(original_key)
        return _record(self.name, image=data, image_ref=path, error=error,
                       caption=str(recaption or original or ""),
                       original_caption=str(original) if original else None)


class WebDatasetSource:
    """webdataset-style tar shards: members `<key>.<ext>`; one image member and a
    `.txt` caption (or a `.json` with `caption_key`) per key. The shards are indexed
    once (member offsets), then read by seek."""

    def __init__(self, path: str, caption_key: str = "caption", name: str | None = None):
        self.name = name or f"wds:{path}"
        pattern = os.path.join(path, "*.tar") if os.path.isdir(path) else path
        self._shards = sorted(glob.glob(pattern))
        if not self._shards:
            raise FileNotFoundError(f"source {self.name}: no tar shards match {pattern!r}")
        self._caption_key = caption_key
        self._index: list[tuple[int, str, dict]] = []  # (shard, key, {ext: (offset, size)})
        for s, shard in enumerate(self._shards):
            groups: dict[str, dict] = {}
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    key = os.path.join(os.path.dirname(member.name), key)
                    groups.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
            self._index += [(s, key, members) for key, members in groups.items()]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        s, key, members = self._index[index]
        shard = self._shards[s]
        ref = f"{shard}:{key}"

        def read(ext):
            offset, size = members[ext]
            with open(shard, "rb") as f:
                f.seek(offset)
                return f.read(size)

        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None:
            return _record(self.name, image_ref=ref, error=f"{ref} has no image member")
        caption = ""
        if "txt" in members:
            caption = read("txt").decode("utf-8", "replace")
        elif "json" in members:
            try:
                caption = str(json.loads(read("json")).get(self._caption_key, ""))
            except (ValueError, AttributeError):
                return _record(self.name, image_ref=ref, error=f"{ref}.json is not a JSON object")
        return _record(self.name, image=read(image_ext), image_ref=ref, caption=caption)


class TfdsSource:
    """A TFDS dataset the user prepared (ArrayRecord format), read with
    `tfds.data_source` (no TensorFlow). `image_key` holds encoded bytes or a
    uint8 array; `caption_key` text (or question/answer keys for VQA, whose prompt
    gets `suffix`)."""

    def __init__(self, path: str, split: str = "train", dataset: str | None = None,
                 image_key: str = "image", caption_key: str = "caption",
                 question_key: str | None = None, answer_key: str | None = None, name: str | None = None,
                 suffix: str = "short_answer"):
        # `path` is the data_dir; `dataset` the builder name (default: the folder's only dataset).
        if dataset is None:
            found = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))
                     and d != "downloads" and not d.startswith(".")]
            if len(found) != 1:
                raise ValueError(f"tfds source {path}: pass dataset=<name>; found {found}")
            dataset = found[0]
        self.name = name or f"tfds:{dataset}/{split}"
        self._args = (dataset, path, split)
        self._keys = (image_key, caption_key, question_key, answer_key)
        self._suffix = _check_suffix(self.name, suffix)
        self._len = len(self._reader())

    def _reader(self):
        if getattr(self, "_source", None) is None:
            import tensorflow_datasets as tfds

            name, data_dir, split = self._args
            self._source = tfds.data_source(name, data_dir=data_dir, split=split)
        return self._source

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        item = self._reader()[index]
        image_key, caption_key, question_key, answer_key = self._keys
        text = lambda k: (item[k].decode("utf-8", "replace") if isinstance(item[k], bytes)  # noqa: E731
                          else str(item[k])) if k and k in item else None
        image = item.get(image_key)
        if isinstance(image, np.ndarray) and image.dtype == object:
            image = image.item()
        return _record(self.name, image=image, image_ref=f"{self.name}[{index}]",
                       error=None if image is not None else f"no {image_key!r} feature",
                       caption=text(caption_key) or "", question=text(question_key), answer=text(answer_key),
                       prompt_suffix=self._suffix)


class LlavaSource:
    """LLaVA-style conversations: [{"image": path, "conversations": [{"from": "human",
    "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}] as VQA records
    (question fixed, answer the target; `<image>` removed).

    turns: "first" (the release: only the conversation's first (human, gpt) turn) or
    "all" (every turn becomes a record). suffix: the prompt's suffix for these
    records ("none" by default, as the release's LLaVA conversations).
    """

    TURNS = ("first", "all")

    def __init__(self, path: str, image_root: str | None = None, name: str | None = None,
                 turns: str = "first", suffix: str = "none"):
        self.name = name or f"llava:{path}"
        if turns not in self.TURNS:
            raise ValueError(f"source {self.name}: turns={turns!r}; expected one of {list(self.TURNS)}")
        self._suffix = _check_suffix(self.name, suffix)
        self._root = image_root or os.path.dirname(os.path.abspath(path))
        self._items = _load_json_list(path)
        self._turns: list[tuple[int, int]] = []
        for i, item in enumerate(self._items):
            conv = item.get("conversations", []) if isinstance(item, dict) else []
            last = 1 if turns == "first" else len(conv) - 1
            for t in range(0, min(last, len(conv) - 1), 2):
                if conv[t].get("from") == "human" and conv[t + 1].get("from") == "gpt":
                    self._turns.append((i, t))

    def __len__(self) -> int:
        return len(self._turns)

    def __getitem__(self, index: int) -> dict:
        i, t = self._turns[index]
        item = self._items[i]
        conv = item["conversations"]
        question = str(conv[t]["value"]).replace("<image>", "").strip()
        answer = str(conv[t + 1]["value"]).strip()
        qa = dict(question=question, answer=answer, prompt_suffix=self._suffix)
        if "image" not in item:
            return _record(self.name, error=f"conversation {i} has no image", **qa)
        path = os.path.join(self._root, str(item["image"]))
        data, error = _read_file(path)
        return _record(self.name, image=data, image_ref=path, error=error, **qa)


class ShapesSource:
    """The built-in shapes world (shapes.py; `world`: which one, the full world by default,
    the pipeline passes its `data.shapes_world`): renders at `image_size`; captions for
    the t2i stream (`colorless_prob` of them without colors, for GenEval's color-free
    prompts), and a mix of captions and VQA for the i2t stream (each record draws one of
    `tasks`: ("caption", "vqa", "vqa") asks twice as many questions as it captions)."""

    def __init__(self, seed: int = 0, num_records: int = 100_000, image_size: int = 32,
                 world: shapes.World = shapes.FULL_WORLD, tasks=("caption", "vqa"),
                 stream: str = "i2t", colorless_prob: float = 0.2, name: str | None = None):
        self.name = name or f"shapes:{seed}"
        bad = set(tasks) - {"caption", "vqa"}
        if bad or not tasks:
            raise ValueError(f"source {self.name}: tasks must be from ('caption', 'vqa'), got {tasks}")
        self._args = (seed, num_records, image_size, world, tuple(tasks), stream)
        self._colorless_prob = colorless_prob if stream == "t2i" else 0.0

    def __len__(self) -> int:
        return self._args[1]

    def __getitem__(self, index: int) -> dict:
        seed, _, size, world, tasks, stream = self._args
        scene = shapes.scene_record(seed, index, world)
        rng = np.random.default_rng([seed, index, 11])
        image = shapes.render(scene, size)
        if stream == "i2t" and tasks[int(rng.integers(len(tasks)))] == "vqa":
            qa = shapes.questions(scene, world)
            question, answer = qa[int(rng.integers(len(qa)))]
            return _record(self.name, image=image, image_ref=f"{self.name}[{index}]",
                           question=question, answer=answer)
        return _record(self.name, image=image, image_ref=f"{self.name}[{index}]",
                       caption=shapes.caption(scene, rng, self._colorless_prob))


SOURCES = {"json": JsonCaptionSource, "wds": WebDatasetSource, "tfds": TfdsSource,
           "llava": LlavaSource, "shapes": ShapesSource}


def build_source(spec: dict, *, image_size: int, stream: str, world: shapes.World = shapes.FULL_WORLD):
    """A source from a config dict {kind, path?, weight, **options}; shapes sources draw from `world`."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    spec.pop("weight", None)
    if kind not in SOURCES:
        raise ValueError(f"data source kind {kind!r} unknown; expected one of {sorted(SOURCES)}")
    if kind == "shapes":
        spec.setdefault("image_size", image_size)
        spec.setdefault("stream", stream)
        spec.setdefault("world", world)
    elif "path" not in spec:
        raise ValueError(f"data source {kind!r} needs a 'path'; got keys {sorted(spec)}")
    try:
        return SOURCES[kind](**spec)
    except TypeError as e:
        raise ValueError(f"data source {kind!r}: bad options {sorted(spec)}: {e}") from e
