"""The export's tokenizer and chat template give the ids and prompts transformers gives for the same files."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gemma4_compile.export.bundle import RUNTIME_FILES, copy_runtime_files
from gemma4_compile.fsutil import sha256_file
from gemma4_compile.model.presets import PRESETS
from gemma4_compile.model.tokenizer import build_tokenizer
from gemma4_compile.runtime import RuntimeInputError, TextTokenizer

TEXTS = [
    "Hello! How are you today?",
    "  leading spaces, trailing\n\nnewlines\n",
    "unicode: naïve café — 日本語 🙂",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again, in 日本語?"},
    ],
]


def test_random_checkpoint_tokenizer_has_gemma_ids_and_the_preset_vocabulary():
    tok = build_tokenizer(512)
    assert tok.to_str() == build_tokenizer(512).to_str()  # deterministic
    assert tok.get_vocab_size() == PRESETS["tiny-e2b"].vocab_size
    ids = {t: tok.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
    assert 106 in PRESETS["tiny-e2b"].eos_token_id
    assert tok.decode(tok.encode(TEXTS[2]).ids, skip_special_tokens=True) == TEXTS[2]  # byte-level: lossless


def test_export_carries_the_runtime_files_with_their_sha256(export_dir):
    files = json.loads((export_dir / "export.json").read_text())["files"]
    bundled = [n for n in RUNTIME_FILES if (export_dir / n).is_file()]
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    } <= set(bundled)
    assert all(files[n] == sha256_file(export_dir / n) for n in bundled)
    gen = json.loads((export_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106]


@pytest.mark.parametrize("add_special", [True, False])
def test_ids_equal_transformers(export_dir, add_special):
    ours = TextTokenizer(export_dir)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(export_dir / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text, add_special) == theirs(text, add_special_tokens=add_special)["input_ids"], (
            text
        )
        ids = ours.encode(text, add_special)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_chat_prompts_equal_transformers_apply_chat_template(export_dir):
    ours = TextTokenizer(export_dir)
    theirs = AutoTokenizer.from_pretrained(export_dir)
    for chat in CHATS:
        for gen in (True, False):
            want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.render_chat(chat, add_generation_prompt=gen) == want
        want_ids = theirs.apply_chat_template(
            chat, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert ours.encode_chat(chat) == list(want_ids)
    assert (
        ours.render_chat(CHATS[0])
        == "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert ours.defaults.eos_token_ids == (1, 106)


def test_bad_chat_role_is_one_error(export_dir):
    with pytest.raises(RuntimeInputError, match="roles must be"):
        TextTokenizer(export_dir).render_chat([{"role": "tool", "content": "x"}])


def test_an_export_without_tokenizer_says_so(tmp_path, export_dir):
    assert (
        copy_runtime_files(tmp_path, tmp_path / "nowhere") == {}
    )  # a checkpoint without them exports as before
    bare = tmp_path / "bare"
    shutil.copytree(export_dir, bare, ignore=shutil.ignore_patterns(*RUNTIME_FILES))
    with pytest.raises(RuntimeInputError, match="has no tokenizer"):
        TextTokenizer(bare)
