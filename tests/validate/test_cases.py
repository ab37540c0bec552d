"""Default cases straddle the sliding window; prompt files parse or fail with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemma4_compile.errors import Gemma4CompileError
from gemma4_compile.model.presets import PRESETS
from gemma4_compile.validate.cases import default_cases, load_prompts


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-31b"])
def test_default_cases_cover_the_window(preset):
    spec = PRESETS[preset]
    W = spec.sliding_window
    cases = {c.name: c for c in default_cases(spec)}
    assert cases["short"].max_len < W
    assert cases["window"].max_len == W
    assert cases["long"].max_len >= 3 * W
    ragged = cases["ragged"]
    assert ragged.batch == 2 and ragged.lengths[0] > W > ragged.lengths[1]
    assert (ragged.input_ids[1, ragged.lengths[1] :] == spec.pad_token_id).all()
    for c in cases.values():
        assert (c.input_ids[:, 0] == spec.bos_token_id).all()
        assert c.input_ids.max() < spec.vocab_size
    again = default_cases(spec)
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(cases.values(), again))


def test_prompt_file_batch1_and_ragged(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([[2, 10, 11, 12], [[2, 5, 6], [2, 7, 8, 9, 10]]]))
    one, two = load_prompts(path, PRESETS["tiny-e2b"])
    assert one.batch == 1 and one.lengths.tolist() == [4]
    assert two.batch == 2 and two.lengths.tolist() == [3, 5]
    assert two.input_ids[0].tolist() == [2, 5, 6, 0, 0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "non-empty JSON list"),
        ('{"prompts": [[1, 2]]}', "non-empty JSON list"),
        ('[[1, "a"]]', "case 0 must be a non-empty list of token ids"),
        ("[[1, 2], []]", "case 1 must be"),
        ("[[1, true]]", "case 0 must be"),
        ("[[2, 512]]", r"case 0: token 512 is outside the vocabulary \[0, 512\)"),
        ("[[[2, 3], [-1]]]", "token -1 is outside"),
    ],
)
def test_bad_prompt_files_fail_in_one_line(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(Gemma4CompileError, match=message) as e:
        load_prompts(path, PRESETS["tiny-e2b"])
    assert "\n" not in str(e.value)


def test_prompt_file_missing_or_too_long(tmp_path):
    with pytest.raises(Gemma4CompileError, match="cannot read"):
        load_prompts(tmp_path / "nope.json", PRESETS["tiny-e2b"])
    path = tmp_path / "p.json"
    path.write_text(json.dumps([[2] * 20]))
    with pytest.raises(Gemma4CompileError, match="20 tokens exceed the maximum length 16"):
        load_prompts(path, PRESETS["tiny-e2b"], max_len=16)
