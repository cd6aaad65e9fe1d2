"""Token layouts: EOS padding, truncation, label/fixed masks, the VQA prompt."""
import numpy as np
import pytest

from dual_diffusion.data import text_layout
from dual_diffusion.data.shapes import shapes_captions_corpus
from dual_diffusion.tokenizer import Tokenizer, train_sentencepiece


class WordTokenizer:
    """One id per word (known strings -> known ids); EOS 1 like T5."""
    eos_id, pad_id = 1, 0

    def __init__(self):
        self.vocab = {}

    def encode(self, text, add_eos=True):
        ids = [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.split()]
        return ids + [1] if add_eos else ids


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    path = train_sentencepiece(shapes_captions_corpus(0, 100), tmp_path_factory.mktemp("spm") / "sp", 200)
    return Tokenizer(path)


def test_caption_is_eos_padded_and_fully_labelled():
    tok = WordTokenizer()
    lay = text_layout.caption_layout(tok, "two red circles", 6)
    a, b, c = tok.vocab["two"], tok.vocab["red"], tok.vocab["circles"]
    assert lay.text_ids.tolist() == [a, b, c, 1, 1, 1]
    assert lay.text_ids.dtype == np.int32
    assert lay.label_mask.all() and not lay.fixed_mask.any() and not lay.truncated


def test_caption_truncation_keeps_eos_last():
    tok = WordTokenizer()
    lay = text_layout.caption_layout(tok, "w1 w2 w3 w4 w5", 4)
    assert lay.truncated
    assert lay.text_ids.tolist() == [tok.vocab["w1"], tok.vocab["w2"], tok.vocab["w3"], 1]
    exact = text_layout.caption_layout(tok, "w1 w2 w3", 4)  # 3 words + EOS fit exactly
    assert not exact.truncated and exact.text_ids[-1] == 1


def test_caption_matches_tokenizer_encode_batch(spm_tok):
    texts = ["two red circles and a blue square", "a green triangle left of a yellow circle " * 4]
    expected = spm_tok.encode_batch(texts, 16, pad_id=spm_tok.eos_id)
    rows = [text_layout.caption_layout(spm_tok, t, 16) for t in texts]
    np.testing.assert_array_equal(np.stack([r.text_ids for r in rows]), expected)
    assert [r.truncated for r in rows] == [False, True]


def test_vqa_layout_known_strings():
    tok = WordTokenizer()
    q, ans = "what color is the circle?", "dark red"
    lay = text_layout.vqa_layout(tok, q, ans, 32)
    prompt = f"Q: {q} Answer the question using a single word or phrase. A:".split()
    n = len(prompt)
    assert lay.text_ids[:n].tolist() == [tok.vocab[w] for w in prompt]
    assert lay.text_ids[n:n + 3].tolist() == [tok.vocab["dark"], tok.vocab["red"], 1]
    assert (lay.text_ids[n + 3:] == 1).all()
    assert lay.fixed_mask.tolist() == [True] * n + [False] * (32 - n)
    assert lay.label_mask.tolist() == [False] * n + [True] * 3 + [False] * (32 - n - 3)
    padded = text_layout.vqa_layout(tok, q, ans, 32, label_padding=True)
    assert padded.label_mask.tolist() == [False] * n + [True] * (32 - n)
    assert not lay.truncated


def test_vqa_truncation_keeps_answer_and_prompt_tail():
    tok = WordTokenizer()
    lay = text_layout.vqa_layout(tok, "a very long question " * 5, "yes", 12)
    assert lay.truncated
    ids = lay.text_ids.tolist()
    assert ids[-2:] == [tok.vocab["yes"], 1]
    assert ids[-3] == tok.vocab["A:"] and lay.fixed_mask.sum() == 10
    assert lay.label_mask.tolist() == [False] * 10 + [True, True]
    long_answer = text_layout.vqa_layout(tok, "why?", " ".join(f"x{i}" for i in range(40)), 20)
    assert long_answer.truncated and long_answer.text_ids[-1] == 1
    assert long_answer.label_mask.sum() == 10 and long_answer.fixed_mask.sum() == 10


def test_vqa_prompt_round_trip(spm_tok):
    lay = text_layout.vqa_layout(spm_tok, "how many squares are there?", "two", 64)
    prefix = lay.text_ids[lay.fixed_mask]
    assert spm_tok.decode(prefix) == text_layout.vqa_prompt("how many squares are there?").strip()
    assert spm_tok.decode(lay.text_ids[lay.label_mask]) == "two"
    assert lay.text_ids[lay.label_mask][-1] == spm_tok.eos_id


def test_caption_without_label_padding_labels_caption_and_first_eos():
    tok = WordTokenizer()
    full = text_layout.caption_layout(tok, "two red circles", 6)
    lay = text_layout.caption_layout(tok, "two red circles", 6, label_padding=False)
    assert lay.text_ids.tolist() == full.text_ids.tolist()
    assert lay.label_mask.tolist() == [True, True, True, True, False, False]
    trunc = text_layout.caption_layout(tok, "w1 w2 w3 w4 w5", 4, label_padding=False)
    assert trunc.label_mask.all()  # truncated: the EOS is last, every position counts
    assert text_layout.caption_label_mask(np.array([5, 6, 7]), 1).all()  # no EOS at all: all positions


def test_vqa_prompt_suffix_per_source():
    """The release: `Q: {human} A: ` for LLaVA conversations, the short-answer instruction for VQA sets,
    LLaVA-1.5's 'Unanswerable' variant for VizWiz; a question that already carries it is left as it is."""
    assert text_layout.vqa_prompt(" What is this? ", "none") == "Q: What is this? A: "
    short = "Q: What is this? Answer the question using a single word or phrase. A: "
    assert text_layout.vqa_prompt("What is this?") == text_layout.vqa_prompt("What is this?", "short_answer") == short
    assert text_layout.vqa_prompt("What is this?\nAnswer the question using a single word or phrase.",
                                  "short_answer") == short.replace("? A", "?\nA", 1)
    assert text_layout.vqa_prompt("What is this?", "vizwiz") == (
        "Q: What is this? When the provided information is insufficient, respond with 'Unanswerable'. "
        "Answer the question using a single word or phrase. A: ")
    with pytest.raises(ValueError, match="suffix='short'"):
        text_layout.vqa_prompt("What?", "short")
    tok = WordTokenizer()
    lay = text_layout.vqa_layout(tok, "is it red?", "yes", 12, suffix="none")
    n = len("Q: is it red? A:".split())
    assert lay.fixed_mask.sum() == n and lay.text_ids[n] == tok.vocab["yes"]
