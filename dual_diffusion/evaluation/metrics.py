"""Benchmark metrics that need no model: VQAv2 accuracy and COCO caption scoring.

VQAv2 (the official evaluation's rules, written from its description):
  normalisation: newlines/tabs -> spaces; the punctuation marks in `_VQA_PUNCT`
  are deleted when they touch a space (or when the text holds a digit-comma-digit
  group) and become spaces otherwise; a period not followed by a digit is
  deleted (so "1.5" survives); lower case; number words zero..ten -> digits;
  articles a/an/the dropped; apostrophe-less contractions restored ("dont" ->
  "don't").
  accuracy of one answer = mean over the 10 leave-one-out subsets of 9 human
  answers of min(#humans in the subset who gave it / 3, 1): 1 of 10 humans ->
  0.3, 3 of 10 -> 0.9, 4 or more -> 1.0.

COCO captions: CIDEr-D from pycocoevalcap (the "eval" extra), on captions
tokenized by `coco_tokenize`, a pure-Python stand-in for the PTB tokenizer the
official toolkit runs through Java (lower case, clitics split off, punctuation
dropped), so scores can differ slightly from the official server's.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

# ------------------------------------------------------------------------- VQA
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
              ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions that annotators type without the apostrophe. Forms whose
# apostrophe-less spelling is a common word ("well", "were", "its", "ill", "lets")
# are left out, as the official table does.
_CONTRACTIONS_WITH_APOSTROPHE = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he's how'd how'll how's it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't shan't she'd she'd've she's should've shouldn't shouldn't've somebody'd
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas
wasn't we'd we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd
who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    """'dont' -> "don't"; for two apostrophes also each half-stripped form ("couldnt've", "couldn'tve")."""
    table = {}
    for word in _CONTRACTIONS_WITH_APOSTROPHE:
        table[word.replace("'", "")] = word
        positions = [i for i, ch in enumerate(word) if ch == "'"]
        if len(positions) > 1:
            for i in positions:
                table[word[:i] + word[i + 1:]] = word
    return table


_CONTRACTIONS = _contraction_table()


def _vqa_punctuation(text: str) -> str:
    out = text
    # A digit-comma-digit group anywhere means every mark is deleted, not spaced (official quirk).
    joined_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _VQA_PUNCT:
        if f"{mark} " in text or f" {mark}" in text or joined_number:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_normalize(answer: str) -> str:
    """The official VQAv2 answer normalisation (module docstring)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one predicted answer against the (usually 10) human answers."""
    if not human_answers:
        raise ValueError("vqa_accuracy: no human answers")
    pred = vqa_normalize(prediction)
    truths = [vqa_normalize(a) for a in human_answers]
    if len(truths) == 1:
        return float(pred == truths[0])
    scores = []
    for left_out in range(len(truths)):
        agree = sum(t == pred for i, t in enumerate(truths) if i != left_out)
        scores.append(min(1.0, agree / 3.0))
    return sum(scores) / len(scores)


def vqa_scores(predictions: Sequence[str], human_answers: Sequence[Sequence[str]],
               answer_types: Sequence[str] | None = None) -> dict:
    """{'accuracy': mean, 'accuracy_<type>': per answer type (yes/no, number, other) when given, 'n'}."""
    if len(predictions) != len(human_answers):
        raise ValueError(f"vqa_scores: {len(predictions)} predictions for {len(human_answers)} questions")
    accs = [vqa_accuracy(p, h) for p, h in zip(predictions, human_answers)]
    out = {"accuracy": sum(accs) / len(accs) if accs else 0.0, "n": len(accs)}
    if answer_types is not None:
        by_type: dict[str, list[float]] = {}
        for acc, kind in zip(accs, answer_types):
            by_type.setdefault(kind, []).append(acc)
        out.update({f"accuracy_{kind.replace('/', '_')}": sum(v) / len(v) for kind, v in sorted(by_type.items())})
    return out


# ------------------------------------------------------------------ captions
_CLITICS = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)\b")
_CAPTION_PUNCT = re.compile(r"[.,?!:;\"()\[\]{}`]|''|--+|(?<!\w)-|-(?!\w)|(?<!\w)'|'(?!\w)")


def coco_tokenize(caption: str) -> str:
    """Lower case, clitics split off ("dog's" -> "dog 's"), punctuation dropped; space-joined tokens."""
    text = _CAPTION_PUNCT.sub(" ", caption.lower().replace("\n", " "))
    return " ".join(_CLITICS.sub(r" \1", text).split())


class MissingPackageError(ImportError):
    """An optional dependency is not installed; the message names it."""


def require_pycocoevalcap() -> None:
    import importlib.util

    if importlib.util.find_spec("pycocoevalcap") is None:
        raise MissingPackageError("COCO caption scoring needs the package `pycocoevalcap` "
                                  "(pip install pycocoevalcap, or pip install dual_diffusion[eval])")


def cider_score(references: Mapping, predictions: Mapping) -> dict:
    """CIDEr-D of {id: caption} against {id: [reference captions]} via pycocoevalcap."""
    require_pycocoevalcap()
    from pycocoevalcap.cider.cider import Cider

    missing = sorted(set(predictions) ^ set(references), key=str)
    if missing:
        raise ValueError(f"cider_score: ids {missing[:5]} are not in both predictions and references")
    gts = {k: [coco_tokenize(r) for r in refs] for k, refs in references.items()}
    res = {k: [coco_tokenize(predictions[k])] for k in references}
    score, _ = Cider().compute_score(gts, res)
    return {"CIDEr": float(score), "n": len(res)}
