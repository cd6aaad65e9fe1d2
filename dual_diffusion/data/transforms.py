"""Per-record transforms: decode -> size filter -> RGB -> resize shorter side +
centre crop (bicubic, antialiased) -> [-1, 1] -> token layout.

Size filter (the release's): an image whose shorter side is under `min_side` or
whose aspect ratio (long / short side) is over `max_aspect` is a bad record (0
disables either); it is judged on the stored size, before any JPEG draft scaling.

`ExampleBuilder` is the one grain RandomMap of a stream. It never raises on bad
data: a record it cannot use becomes `{"_bad": reason, "source": name}`, which
`SkipBadIterDataset` (pipeline.py) drops and counts.
"""
from __future__ import annotations

import io

import numpy as np
from absl import logging
from PIL import Image

from dual_diffusion.data import text_layout


class BadRecord(Exception):
    pass


def check_size(width: int, height: int, min_side: int = 0, max_aspect: float = 0.0) -> None:
    """Raises BadRecord for an image the release's filter drops (0 disables a limit)."""
    short, long = min(width, height), max(width, height)
    if min_side and short < min_side:
        raise BadRecord(f"image {width}x{height}: shorter side {short} < min_image_side {min_side}")
    if max_aspect and long > max_aspect * short:
        raise BadRecord(f"image {width}x{height}: aspect ratio {long / max(short, 1):.2f} > max_aspect_ratio "
                        f"{max_aspect:g}")


def decode_image(data, size_hint: int | None = None, min_side: int = 0,
                 max_aspect: float = 0.0) -> tuple[np.ndarray, bool]:
    """bytes (any PIL format) or an array -> (uint8 (H, W, 3), converted).

    `converted` is True when the image was not RGB (gray, alpha, palette, CMYK).
    For JPEGs, `size_hint` lets libjpeg decode at a reduced scale (DCT scaling)
    that still covers the target size: much faster for large photos.
    `min_side` / `max_aspect`: see `check_size` (read from the header, before decoding).
    """
    if data is None:
        raise BadRecord("no image")
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(data)))
        except Exception as e:  # PIL raises many types on corrupt files
            raise BadRecord(f"corrupt image ({e.__class__.__name__}: {e})") from None
        check_size(*img.size, min_side, max_aspect)
        try:
            if size_hint and img.format == "JPEG":
                img.draft("RGB", (size_hint, size_hint))
            img.load()
        except Exception as e:  # PIL raises many types on corrupt files
            raise BadRecord(f"corrupt image ({e.__class__.__name__}: {e})") from None
        converted = img.mode != "RGB"
        if converted:
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(canvas, img)
            img = img.convert("RGB")
        return np.asarray(img, np.uint8), converted
    array = np.asarray(data)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise BadRecord(f"image array must be uint8 (H, W[, C]), got {array.dtype} {array.shape}")
    check_size(array.shape[1], array.shape[0], min_side, max_aspect)
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2), True
    if array.shape[2] == 3:
        return array, False
    if array.shape[2] in (1, 4):
        return (np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]), True
    raise BadRecord(f"image array has {array.shape[2]} channels")


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): shorter side to `size` (PIL bicubic,
    which widens its kernel when downscaling, i.e. antialiased), then centre crop."""
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise BadRecord(f"empty image {image.shape}")
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return image.astype(np.float32) * (2.0 / 255.0) - 1.0


class ExampleBuilder:
    """grain RandomMap: raw record (sources.py) + rng -> example of one stream.

    Example: {"image": f32 (S, S, 3), "text_ids": i32 (L,), "label_mask": bool (L,),
    "fixed_mask": bool (L,), "truncated": i32, "converted": i32, "skipped": i32}.
    The t2i stream only takes caption records (VQA records there are bad data).
    Size filter: min_image_side is capped at image_size, so an image that needs no
    upscaling is never dropped for its size (the demo's 32 px shapes world keeps
    the release's 256 px default); max_aspect_ratio applies as given.
    """

    def __init__(self, tokenizer, *, image_size: int, text_length: int, stream: str,
                 original_caption_prob: float = 0.0, vqa_label_padding: bool = False,
                 min_image_side: int = 0, max_aspect_ratio: float = 0.0):
        if stream not in ("t2i", "i2t"):
            raise ValueError(f"stream must be 't2i' or 'i2t', got {stream!r}")
        if min_image_side < 0 or max_aspect_ratio < 0 or 0 < max_aspect_ratio < 1:
            raise ValueError(f"data.min_image_side={min_image_side}, data.max_aspect_ratio={max_aspect_ratio}: "
                             "expected a side >= 0 and a ratio >= 1 (0 disables either)")
        self.tokenizer = tokenizer
        self.image_size, self.text_length, self.stream = image_size, text_length, stream
        self.original_caption_prob = original_caption_prob
        self.vqa_label_padding = vqa_label_padding
        self.min_side, self.max_aspect = min(int(min_image_side), image_size), float(max_aspect_ratio)
        self._truncations = 0  # per process; the exact count rides in each example

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        try:
            return self._build(record, rng)
        except BadRecord as e:
            return {"_bad": str(e), "source": record.get("source", "?"), "ref": record.get("image_ref", "")}

    def _build(self, record: dict, rng: np.random.Generator) -> dict:
        if record.get("error"):
            raise BadRecord(record["error"])
        if record.get("question") is not None:
            if self.stream == "t2i":
                raise BadRecord("VQA record in the text-to-image stream")
            question, answer = record["question"].strip(), (record.get("answer") or "").strip()
            if not question or not answer:
                raise BadRecord("empty question or answer")
            layout = text_layout.vqa_layout(self.tokenizer, question, answer, self.text_length,
                                            label_padding=self.vqa_label_padding,
                                            suffix=record.get("prompt_suffix") or "short_answer")
        else:
            text = record.get("caption") or ""
            original = record.get("original_caption")
            if original and self.original_caption_prob and rng.random() < self.original_caption_prob:
                text = original
            if not text.strip():
                raise BadRecord("empty caption")
            layout = text_layout.caption_layout(self.tokenizer, text.strip(), self.text_length)
        if layout.truncated:
            self._truncations += 1
            if self._truncations <= 3 or self._truncations % 10_000 == 0:
                logging.warning("data %s: text truncated to %d tokens (%d so far in this process): %r",
                                self.stream, self.text_length, self._truncations,
                                (record.get("question") or record.get("caption") or "")[:80])
        pixels, converted = decode_image(record.get("image"), size_hint=self.image_size,
                                         min_side=self.min_side, max_aspect=self.max_aspect)
        pixels = resize_center_crop(pixels, self.image_size)
        return {
            "image": normalize(pixels),
            "text_ids": layout.text_ids,
            "label_mask": layout.label_mask,
            "fixed_mask": layout.fixed_mask,
            "truncated": np.int32(layout.truncated),
            "converted": np.int32(converted),
            "skipped": np.int32(0),
        }
