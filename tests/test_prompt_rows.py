"""Prompt rows as the release's pipeline builds them: the pad token its tokenizer folder declares,
`padding="max_length"`, truncation (README, Sampling); checked against transformers' T5Tokenizer loaded
from tiny tokenizer folders made here."""
from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from dual_diffusion.inference.pipelines import Pipeline, prompt_pad_id
from dual_diffusion.tokenizer import Tokenizer, declared_pad_token, train_sentencepiece

PROMPTS = ["a red circle", "two blue squares on the left", "",
           "a green triangle above a yellow square and two red circles below a blue square"]
EOS_MAP = {"pad_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False}}
# folder -> (tokenizer_config.json, special_tokens_map.json, the pad token transformers resolves)
FOLDERS = {
    "nothing declared": ({"extra_ids": 100}, None, "<pad>"),
    "config": ({"extra_ids": 100, "pad_token": "</s>"}, None, "</s>"),
    "map overrides config": ({"extra_ids": 100, "pad_token": "<pad>"}, EOS_MAP, "</s>"),
    "config with added_tokens_decoder": ({"extra_ids": 100, "pad_token": "<unk>", "added_tokens_decoder": {}},
                                         {"pad_token": "</s>"}, "<unk>"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from dual_diffusion.data import shapes

    root = tmp_path_factory.mktemp("tokenizers")
    model = train_sentencepiece(shapes.shapes_captions_corpus(0, 100), root / "spiece", vocab_size=120)
    out = {}
    for name, (config, mapped, _) in FOLDERS.items():
        folder = root / name.replace(" ", "_")
        folder.mkdir()
        shutil.copy(model, folder / "spiece.model")
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        if mapped is not None:
            (folder / "special_tokens_map.json").write_text(json.dumps(mapped))
        out[name] = folder
    return out


def _release_rows(folder, prompts, length):
    """The release's pipeline (dual_diff_pipeline.py, ~404-411): its tokenizer from the folder, then
    tokenizer(prompt, padding="max_length", max_length=L, truncation=True, add_special_tokens=True)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.T5Tokenizer.from_pretrained(str(folder))
    rows = hf(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True)
    return np.asarray(rows.input_ids), hf.pad_token


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_prompt_rows_equal_the_release_pipeline_with_the_declared_pad(folders, name, caplog):
    folder, want = folders[name], FOLDERS[name][2]
    token, source = declared_pad_token(folder)
    release, hf_pad = _release_rows(folder, PROMPTS, 16)
    assert token == hf_pad == want, (source, token, hf_pad)
    tokenizer = Tokenizer(folder)
    converted = SimpleNamespace(info={"format": "dual_diffusion/converted", "tokenizer": {}}, tokenizer=tokenizer)
    pipe = Pipeline({"transformer": None, "text_encoder": None}, tokenizer, text_length=16, image_size=32,
                    pad_id=prompt_pad_id(converted))  # no recorded pad id: read from the folder
    with caplog.at_level(logging.WARNING):
        rows = pipe.encode_prompts(PROMPTS)
    np.testing.assert_array_equal(rows, release)
    assert "prompt 3 " in caplog.text and "truncated to 16 tokens" in caplog.text  # a warning, not an error
    with pytest.raises(ValueError, match="prompt 3 .* tokens with EOS; the model's text length is 16"):
        pipe.encode_prompts(PROMPTS, truncate=False)  # what the evaluation suites ask for


def test_pad_choice_per_source():
    """Converted: the recorded declared pad by default; a training workdir: EOS, as it trained; either
    way --prompt-padding chooses."""
    tokenizer = SimpleNamespace(model_file=None)
    converted = SimpleNamespace(info={"format": "dual_diffusion/converted", "tokenizer": {"pad_id": 0}},
                                tokenizer=tokenizer)
    workdir = SimpleNamespace(info={"step": 100, "tokenizer": "tok.model"}, tokenizer=tokenizer)
    assert prompt_pad_id(converted) == 0 and prompt_pad_id(converted, "eos") == 1
    assert prompt_pad_id(workdir) == 1
    with pytest.raises(ValueError, match="prompt_padding='zero'"):
        prompt_pad_id(converted, "zero")
