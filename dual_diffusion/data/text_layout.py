"""Token layouts of the text stream: captions and VQA (REFERENCE.md, Objectives/Inference).

Every layout is a fixed-length row of `length` token ids plus two masks:
- `label_mask` (True where the text loss counts);
- `fixed_mask` (True where a position is never masked: the VQA question prefix).

Captions (T5 semantics, as the release): the tokenizer appends EOS; a caption
longer than `length` keeps its first `length - 1` tokens and ends with EOS (the
truncation is reported so the pipeline can count it); the row is padded with EOS
(id 1), not with pad (0), because that is what the release's T5 sees. The label
mask of a caption covers *all* positions, EOS padding included, as the release:
the masked-diffusion captioner must learn where a caption ends, and at sampling
time every position starts masked. With `label_padding=False` the mask covers the
caption and its first EOS only (as VQA answers): a short caption in a long row then
weighs its content, not dozens of trivially predicted pads (a from-scratch demo).

VQA: `Q: {question} {suffix} A: ` (fixed), then the answer, its EOS, and EOS
padding. The suffix follows the release per source (`PROMPT_SUFFIXES`):
"short_answer" ("Answer the question using a single word or phrase.", the
short-answer VQA sets and the built-in shapes world), "vizwiz" (LLaVA-1.5's
VizWiz prompt) or "none" (`Q: {question} A: `, other LLaVA conversations). The
label mask covers the answer tokens and the EOS that ends them ("answer only");
trailing padding is neither fixed nor labelled unless `label_padding=True`: then
every non-prefix position is labelled, as the release's stage 3 (its label mask
is padded with ones), which teaches the padding too.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

VQA_SUFFIX = "Answer the question using a single word or phrase."
VIZWIZ_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'. " + VQA_SUFFIX
PROMPT_SUFFIXES = {"short_answer": VQA_SUFFIX, "vizwiz": VIZWIZ_SUFFIX, "none": ""}


class TokenizerLike(Protocol):
    eos_id: int

    def encode(self, text: str, add_eos: bool = True) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class TextLayout:
    text_ids: np.ndarray    # int32 (L,)
    label_mask: np.ndarray  # bool (L,)
    fixed_mask: np.ndarray  # bool (L,)
    truncated: bool


def vqa_prompt(question: str, suffix: str = "short_answer") -> str:
    """The release's prompt `Q: {question} {suffix} A: `; the answer follows directly after 'A: '.

    A question that already ends with the suffix (LLaVA-1.5's own VQA conversations
    carry it) does not get it twice.
    """
    if suffix not in PROMPT_SUFFIXES:
        raise ValueError(f"VQA prompt suffix={suffix!r}; expected one of {sorted(PROMPT_SUFFIXES)}")
    question, tail = question.strip(), PROMPT_SUFFIXES[suffix]
    if tail and not question.endswith(tail):
        question = f"{question} {tail}"
    return f"Q: {question} A: "


def _pad(ids: list[int], length: int, pad_id: int) -> np.ndarray:
    row = np.full((length,), pad_id, np.int32)
    row[: len(ids)] = ids
    return row


def caption_label_mask(text_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """bool (L,): positions up to and including the first EOS (all if there is none)."""
    eos = np.flatnonzero(np.asarray(text_ids) == eos_id)
    label = np.zeros(np.shape(text_ids), bool)
    label[: (int(eos[0]) + 1) if eos.size else len(label)] = True
    return label


def caption_layout(tokenizer: TokenizerLike, text: str, length: int, label_padding: bool = True) -> TextLayout:
    """Caption ids padded with EOS; label mask all True, or caption + first EOS (see module doc)."""
    if length < 1:
        raise ValueError(f"text length must be >= 1, got {length}")
    ids = list(tokenizer.encode(text, add_eos=True))
    truncated = len(ids) > length
    if truncated:
        ids = ids[: length - 1] + [tokenizer.eos_id]
    text_ids = _pad(ids, length, tokenizer.eos_id)
    return TextLayout(
        text_ids=text_ids,
        label_mask=np.ones((length,), bool) if label_padding else caption_label_mask(text_ids, tokenizer.eos_id),
        fixed_mask=np.zeros((length,), bool),
        truncated=truncated,
    )


def vqa_layout(tokenizer: TokenizerLike, question: str, answer: str, length: int,
               label_padding: bool = False, suffix: str = "short_answer") -> TextLayout:
    """Fixed question prefix + answer + EOS + EOS padding.

    Too long: the answer keeps at most `length // 2` positions (with its EOS), and
    the prompt loses tokens from its *start* so 'Answer the question ... A:' stays
    next to the answer.
    """
    if length < 2:
        raise ValueError(f"VQA text length must be >= 2, got {length}")
    prompt = list(tokenizer.encode(vqa_prompt(question, suffix), add_eos=False))
    answer_ids = list(tokenizer.encode(answer, add_eos=True))
    truncated = len(prompt) + len(answer_ids) > length
    if truncated:
        answer_room = max(length - len(prompt), min(len(answer_ids), length // 2), 1)
        if len(answer_ids) > answer_room:
            answer_ids = answer_ids[: answer_room - 1] + [tokenizer.eos_id]
        keep = min(len(prompt), length - len(answer_ids))
        prompt = prompt[len(prompt) - keep:]
    n_prompt, n_answer = len(prompt), len(answer_ids)
    fixed = np.zeros((length,), bool)
    fixed[:n_prompt] = True
    label = np.zeros((length,), bool)
    if label_padding:
        label[n_prompt:] = True
    else:
        label[n_prompt: n_prompt + n_answer] = True
    return TextLayout(
        text_ids=_pad(prompt + answer_ids, length, tokenizer.eos_id),
        label_mask=label,
        fixed_mask=fixed,
        truncated=truncated,
    )
