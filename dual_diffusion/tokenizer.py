"""T5's SentencePiece tokenizer with transformers' T5Tokenizer semantics (REFERENCE.md, Tokenizer).

Built on the `sentencepiece` package only. Id layout (T5): the SentencePiece
pieces (pad 0, eos 1, unk 2, ...) followed by `extra_ids` sentinels stored in
reverse, so `<extra_id_N>` = vocab_size - 1 - N (32099 - N for T5's 32000
pieces). D-DiT's mask token is `<extra_id_0>`.

Matching transformers 5.23 `T5Tokenizer` (a `tokenizers`-backed Unigram):
  * the special-token strings `<pad>`, `</s>`, `<unk>` and `<extra_id_N>`
    (N < extra_ids) written in the text are cut out first and become their ids;
    each piece of text between them is encoded on its own, with SentencePiece's
    dummy-prefix space, and whitespace-only pieces vanish. So
    "a<extra_id_0>." encodes "." as "▁." and spaces around a sentinel are dropped.
  * EOS is appended; `encode_batch` truncates to `length - 1` tokens and then
    appends EOS, i.e. a truncated row still ends with EOS, exactly as
    `tokenizer(text, max_length=L, truncation=True, padding="max_length")`.
  * decode(skip_special_tokens=True) drops every special id (pad, eos, unk and
    the sentinels), as transformers does, then lets SentencePiece detokenize.

`declared_pad_token(folder)` reads the pad token a diffusers tokenizer folder
declares, as transformers resolves it (the release pads prompts with it).
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
DEFAULT_PAD_TOKEN = "<pad>"  # T5Tokenizer's default when a folder declares none


class Tokenizer:
    """T5 tokenizer: `Tokenizer("spiece.model")`; vocab_size = pieces + extra_ids (32100 for T5).

    model_file may also be a folder holding `spiece.model` (diffusers' `tokenizer_3/`).
    """

    def __init__(self, model_file: str | Path, extra_ids: int = 100):
        model_file = Path(model_file)
        if model_file.is_dir():
            model_file = model_file / "spiece.model"
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer: SentencePiece model {str(model_file)!r} does not exist")
        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        found = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
        if found != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(f"tokenizer {model_file}: (pad, eos, unk) ids are {found}; T5 needs "
                             f"{(PAD_ID, EOS_ID, UNK_ID)}")
        if extra_ids < 0:
            raise ValueError(f"tokenizer: extra_ids={extra_ids}; expected >= 0")
        self._num_pieces = self._sp.get_piece_size()
        self._extra_ids = extra_ids
        self._special = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
        self._special.update({f"<extra_id_{n}>": self.extra_id(n) for n in range(extra_ids)})
        # Longest first, so "<extra_id_10>" wins over a prefix match (transformers matches leftmost-longest).
        names = sorted(self._special, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(s) for s in names) + ")")
        self._name_of = {i: s for s, i in self._special.items()}

    # ---- ids ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._num_pieces + self._extra_ids

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def mask_id(self) -> int:
        """D-DiT's mask token, `<extra_id_0>` (REFERENCE.md, Text input)."""
        return self.extra_id(0)

    def extra_id(self, n: int) -> int:
        """Id of `<extra_id_n>`: sentinels are stored in reverse after the SentencePiece pieces."""
        if not 0 <= n < self._extra_ids:
            raise ValueError(f"tokenizer: <extra_id_{n}> does not exist; extra_ids={self._extra_ids}")
        return self.vocab_size - 1 - n

    def is_special(self, token_id: int) -> bool:
        return token_id in self._name_of

    def token_id(self, token: str) -> int:
        """Id of one token string: a special token (`</s>`, `<extra_id_3>`, ...) or a SentencePiece piece."""
        if token in self._special:
            return self._special[token]
        piece = self._sp.piece_to_id(token)
        if piece == UNK_ID and token != self._sp.id_to_piece(UNK_ID):
            raise ValueError(f"tokenizer {self.model_file}: no token {token!r} in the vocabulary")
        return piece

    # ---- text -> ids ----------------------------------------------------------------------------
    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in the text map to their ids (module docstring)."""
        ids: list[int] = []
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2:  # odd parts are the captured special-token strings
                ids.append(self._special[part])
            elif part:
                ids.extend(self._sp.encode(part))
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def encode_batch(self, texts: Sequence[str], length: int, pad_id: int | None = None,
                     return_truncated: bool = False):
        """int32 (B, length): EOS appended, truncated to length (EOS kept last), padded with pad_id.

        pad_id defaults to self.pad_id; D-DiT pads with EOS (pass pad_id=tokenizer.eos_id).
        With return_truncated=True, returns (ids, number of texts that were cut).
        """
        if length < 1:
            raise ValueError(f"tokenizer.encode_batch: length={length}; expected >= 1")
        pad_id = self.pad_id if pad_id is None else pad_id
        out = np.full((len(texts), length), pad_id, dtype=np.int32)
        truncated = 0
        for row, text in enumerate(texts):
            ids = self.encode(text, add_eos=False)
            if len(ids) + 1 > length:
                truncated += 1
                ids = ids[:length - 1]
            ids.append(EOS_ID)
            out[row, :len(ids)] = ids
        return (out, truncated) if return_truncated else out

    # ---- ids -> text ----------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Special ids are dropped, or written as their strings when not skipped."""
        ids = ids if isinstance(ids, (np.ndarray, list, tuple)) else list(ids)
        ids = np.asarray(ids).reshape(-1).astype(np.int64).tolist()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"tokenizer.decode: id {i} is outside the vocabulary [0, {self.vocab_size})")
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._name_of])
        # Runs of ordinary ids are detokenized by SentencePiece, which drops a run's leading
        # word-boundary space; only the very first one is dropped by transformers, so restore the rest.
        out, run = [], []
        for i in ids + [None]:
            if i is not None and i not in self._name_of:
                run.append(i)
                continue
            if run:
                space = out and self._sp.id_to_piece(run[0]).startswith("\u2581")
                out.append((" " if space else "") + self._sp.decode(run))
                run = []
            if i is not None:
                out.append(self._name_of[i])
        return "".join(out)

    def __len__(self) -> int:
        return self.vocab_size


def declared_pad_token(folder) -> tuple[str, str]:
    """(pad token, the file that declares it) of a tokenizer folder, as transformers' from_pretrained
    resolves it: `tokenizer_config.json`'s "pad_token", overridden by `special_tokens_map.json`'s unless
    the config has "added_tokens_decoder" (then the map is not read); "<pad>" (T5's default, from
    "default") when neither declares one. `folder` is a path or an etils.epath.Path (gs://)."""

    def read(name):
        path = folder / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the tokenizer's settings ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return data

    def token(value):  # a string, or a serialised AddedToken {"content": ...}
        return value.get("content") if isinstance(value, dict) else value

    folder = folder if hasattr(folder, "read_text") else Path(folder)
    config, found = read("tokenizer_config.json"), (DEFAULT_PAD_TOKEN, "default")
    if isinstance(token(config.get("pad_token")), str):
        found = (token(config["pad_token"]), "tokenizer_config.json")
    if "added_tokens_decoder" not in config:
        mapped = token(read("special_tokens_map.json").get("pad_token"))
        if isinstance(mapped, str):
            found = (mapped, "special_tokens_map.json")
    return found


def train_sentencepiece(texts: Iterable[str], model_prefix: str | Path, vocab_size: int,
                        hard_vocab_limit: bool = False, model_type: str = "unigram") -> Path:
    """Trains a T5-style SentencePiece model on in-memory text; writes and returns `<model_prefix>.model`.

    Unigram by default (`model_type="bpe"`: merges, fewer tokens per sentence on a tiny
    closed corpus such as the shapes captions), pad 0 / eos 1 / unk 2, no bos, no byte fallback, nmt_nfkc
    normalization (T5's settings), full character coverage. One thread and no
    sampling of sentences, so the same texts give the same model bytes.
    vocab_size is an upper bound unless hard_vocab_limit: a tiny corpus may
    support fewer pieces (read `Tokenizer(...).vocab_size` afterwards).
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"train_sentencepiece: model_type {model_type!r} not in ('unigram', 'bpe')")
    sentences = [t for t in texts if t and t.strip()]
    if not sentences:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        byte_fallback=False, normalization_rule_name="nmt_nfkc", character_coverage=1.0,
        hard_vocab_limit=hard_vocab_limit, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, minloglevel=2)
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path
