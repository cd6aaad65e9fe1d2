"""Tokenizer: ids equal transformers' T5Tokenizer on the same SentencePiece model."""
import random

import numpy as np
import pytest

from dual_diffusion.tokenizer import Tokenizer, train_sentencepiece

_WORDS = ("a an the photo of cat dog bird red blue green small large two three on in under "
          "table window street city night sunset beach mountain river person woman man child "
          "holding wearing standing sitting near with and is are very bright dark old new "
          "café naïve Zürich façade jalapeño São Paulo Ελλάδα Москва 東京 1 2 3 10 42 2024 3.5 "
          "100% $20 #1 e-mail don't it's").split()
_PUNCT = [",", ".", "!", "?", ";", ":", "(", ")", "\"", "'", "-"]


def _corpus(n=400, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        text = " ".join(w + (rng.choice(_PUNCT) if rng.random() < 0.15 else "") for w in words)
        out.append(text[0].upper() + text[1:])
    return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return train_sentencepiece(_corpus(), tmp_path_factory.mktemp("spm") / "spiece", vocab_size=300)


@pytest.fixture(scope="module")
def tok(model_file):
    return Tokenizer(model_file, extra_ids=100)


@pytest.fixture(scope="module")
def hf_tok(model_file):
    transformers = pytest.importorskip("transformers")
    # transformers 5.23: `T5Tokenizer(vocab_file=...)` alone ignores the file and builds a 4-piece
    # placeholder vocabulary; converting the SentencePiece model first is what from_pretrained does.
    kwargs = transformers.T5Tokenizer.convert_to_native_format(vocab_file=str(model_file))
    return transformers.T5Tokenizer(**kwargs, extra_ids=100)


TEXTS = [
    "A photo of a cat.", "", " ", "two  dogs   on the    beach", "  leading and trailing  ",
    "Red, blue; green! (very) \"bright\" - it's e-mail?", "42 cats, 3.5 dogs, 100% $20 #1 in 2024",
    "café naïve Zürich façade jalapeño São Paulo", "Ελλάδα Москва 東京", "emoji 😀 and ∑ unknown ☃",
    "ＦＵＬＬ ｗｉｄｔｈ ﬁ ligature", "tabs\tand\nnewlines\r\nhere",
    "a <extra_id_0> cat", "a<extra_id_0>cat", "<extra_id_0>", " <extra_id_5> ", "<extra_id_99>.",
    "the <extra_id_0> <extra_id_1> dog<extra_id_99>", "red.<extra_id_0>.", "<extra_id_0><extra_id_10>",
    "<extra_id_100> is not a sentinel", "<extra_id_1a>", "</s> and <pad> and <unk> as text",
]


def test_vocab_layout(tok, hf_tok, model_file):
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    assert tok.vocab_size == pieces + 100 == len(hf_tok) == len(tok)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.mask_id == tok.vocab_size - 1 == hf_tok.convert_tokens_to_ids("<extra_id_0>")
    for n in (0, 1, 5, 99):
        assert tok.extra_id(n) == tok.vocab_size - 1 - n == hf_tok.convert_tokens_to_ids(f"<extra_id_{n}>")
    with pytest.raises(ValueError, match="extra_id_100"):
        tok.extra_id(100)
    assert Tokenizer(model_file.parent / "spiece.model").vocab_size == tok.vocab_size


def test_folder_and_bad_files(tok, model_file, tmp_path):
    (tmp_path / "spiece.model").write_bytes(model_file.read_bytes())
    assert Tokenizer(tmp_path).encode("a cat") == tok.encode("a cat")
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        Tokenizer(tmp_path / "nothing.model")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text).input_ids
    assert tok.encode(text, add_eos=False) == hf_tok(text, add_special_tokens=False).input_ids


def test_encode_fuzz_matches_transformers(tok, hf_tok):
    rng = random.Random(1)
    alphabet = list("abcdefg xyz  .,!?'-09éü東😀\t") + ["<extra_id_0>", "<extra_id_7>", "</s>", " the ", " cat"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(200)]
    assert [tok.encode(t) for t in texts] == [hf_tok(t).input_ids for t in texts]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tok, hf_tok, text):
    ids = hf_tok(text).input_ids
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


def test_decode_round_trip(tok):
    for text in _corpus(50, seed=3):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a photo of a <extra_id_0> cat")
    assert tok.mask_id in ids
    assert tok.decode(ids, skip_special_tokens=False) == "a photo of a<extra_id_0> cat</s>"
    assert tok.decode(np.asarray(ids)) == "a photo of a cat"
    with pytest.raises(ValueError, match=str(tok.vocab_size)):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("length", [1, 2, 5, 12, 40])
def test_encode_batch_matches_transformers(tok, hf_tok, length):
    texts = TEXTS + _corpus(20, seed=5)
    ids, truncated = tok.encode_batch(texts, length, return_truncated=True)
    ref = hf_tok(texts, max_length=length, truncation=True, padding="max_length").input_ids
    assert ids.dtype == np.int32 and ids.shape == (len(texts), length)
    np.testing.assert_array_equal(ids, np.asarray(ref))
    assert truncated == sum(len(tok.encode(t)) > length for t in texts)
    # D-DiT pads with EOS: only the padding changes.
    eos_padded = tok.encode_batch(texts, length, pad_id=tok.eos_id)
    for row, text in enumerate(texts):
        n = min(len(tok.encode(text)), length)
        np.testing.assert_array_equal(eos_padded[row, :n], ids[row, :n])
        assert (eos_padded[row, n:] == tok.eos_id).all() and (ids[row, n:] == tok.pad_id).all()


def test_train_sentencepiece_is_deterministic(tmp_path, model_file):
    again = train_sentencepiece(_corpus(), tmp_path / "again", vocab_size=300)
    assert again.read_bytes() == model_file.read_bytes()


def test_train_sentencepiece_bpe(tmp_path):
    from dual_diffusion.data.shapes import shapes_captions_corpus
    corpus = shapes_captions_corpus(0, 200)
    uni = Tokenizer(train_sentencepiece(corpus, tmp_path / "uni", vocab_size=300))
    bpe_file = train_sentencepiece(corpus, tmp_path / "bpe", vocab_size=300, model_type="bpe")
    bpe = Tokenizer(bpe_file)
    assert bpe_file.read_bytes() == train_sentencepiece(corpus, tmp_path / "again", 300, model_type="bpe").read_bytes()
    # Same special-id layout as the unigram model, and lossless round trips.
    assert (bpe.pad_id, bpe.eos_id, bpe.mask_id) == (0, 1, len(bpe) - 1)
    for text in corpus[::17]:
        ids = bpe.encode(text)
        assert ids[-1] == bpe.eos_id and bpe.decode(ids[:-1]) == text.strip()  # nfkc drops edge spaces
    # The point of BPE here: a closed corpus gets whole-word merges, so rows are shorter.
    assert sum(map(len, map(bpe.encode, corpus))) < sum(map(len, map(uni.encode, corpus)))
    with pytest.raises(ValueError, match="model_type 'word'"):
        train_sentencepiece(corpus, tmp_path / "bad", 300, model_type="word")
