"""Random checkpoints in the released layout, and the lazy loader's checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

from gemma4_compile.errors import CheckpointError
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import PRESETS
from gemma4_compile.model.weights import CheckpointReader, load_model, resolve_text_weights


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


def test_transformers_loads_it_with_no_missing_keys_and_runs(make_checkpoint, tiny_preset):
    path = make_checkpoint(tiny_preset)
    model, info = Gemma4ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True, attn_implementation="eager"
    )
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["mismatched_keys"]
    logits = model(input_ids=torch.arange(1, 20)[None]).logits
    assert logits.shape == (1, 19, PRESETS[tiny_preset].vocab_size) and torch.isfinite(logits).all()


def test_text_only_layout_loads_as_causal_lm(tmp_path):
    write_random_checkpoint(PRESETS["tiny-e4b"], tmp_path / "ck", dtype=torch.float32, multimodal=False)
    assert json.loads((tmp_path / "ck/config.json").read_text())["model_type"] == "gemma4_text"
    _, info = Gemma4ForCausalLM.from_pretrained(tmp_path / "ck", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "ck"), Gemma4ForCausalLM)
    load_model(tmp_path / "ck")  # our loader takes the 'model.' prefix too


def test_deterministic_for_a_seed_and_scales_away_from_one(tmp_path, make_checkpoint):
    a = _tensors(make_checkpoint("tiny-26b-a4b"))
    write_random_checkpoint(PRESETS["tiny-26b-a4b"], tmp_path / "again", dtype=torch.float32)
    write_random_checkpoint(PRESETS["tiny-26b-a4b"], tmp_path / "other", dtype=torch.float32, seed=1)
    b, c = _tensors(tmp_path / "again"), _tensors(tmp_path / "other")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["model.language_model.embed_tokens.weight"], c["model.language_model.embed_tokens.weight"]
    )
    scales = [k for k in a if k.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale"))]
    assert any(k.endswith("layer_scalar") for k in scales) and any(
        k.endswith("per_expert_scale") for k in scales
    )
    for k in scales:
        assert a[k].min() >= 0.5 and a[k].max() <= 1.5 and (a[k] - 1).abs().min() >= 0.1, k


def test_sharded_checkpoint_has_an_index_and_loads(tmp_path):
    path = tmp_path / "sharded"
    write_random_checkpoint(PRESETS["tiny-e2b"], path, dtype=torch.bfloat16, max_shard_bytes=300_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((path / s).is_file() for s in shards)
    ours = load_model(path, torch.float32)
    hf = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        e, t = ours.embed(ids)
        got = ours(
            e, t, torch.zeros(1, dtype=torch.long), torch.tensor([ids.shape[1]]), ours.new_cache(1, 27)
        )[0]
    assert (got - want).abs().max() < 1e-4


def test_kv_shared_leftovers_are_written_and_skipped(make_checkpoint):
    path = make_checkpoint("tiny-e2b")
    reader = CheckpointReader(path)
    assert "model.language_model.layers.7.self_attn.k_proj.weight" in reader.entries  # as released
    names = resolve_text_weights(reader, PRESETS["tiny-e2b"])
    assert "layers.7.self_attn.k_proj.weight" not in names and "layers.3.self_attn.k_proj.weight" in names


# ----- loader errors -------------------------------------------------------------------------------


@pytest.fixture
def ckpt_copy(tmp_path, make_checkpoint):
    dst = tmp_path / "copy"
    shutil.copytree(make_checkpoint("tiny-31b"), dst)
    return dst


def _rewrite(path, mutate):
    from safetensors.torch import save_file

    tensors = _tensors(path)
    mutate(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(ckpt_copy):
    _rewrite(ckpt_copy, lambda t: t.pop("model.language_model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor 'model\.language_model\.layers\.2\.mlp\.up_proj\.weight'"
    ):
        load_model(ckpt_copy)


def test_unexpected_tensor_is_named(ckpt_copy):
    _rewrite(
        ckpt_copy, lambda t: t.update({"model.language_model.layers.2.mlp.extra.weight": torch.zeros(2)})
    )
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'model\.language_model\.layers\.2\.mlp\.extra\.weight'"
    ):
        load_model(ckpt_copy)


def test_misshaped_tensor_is_named(ckpt_copy):
    _rewrite(ckpt_copy, lambda t: t.update({"model.language_model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"'model\.language_model\.norm\.weight'.*\[63\].*\[64\]"):
        load_model(ckpt_copy)


def test_truncated_file_is_named(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.*'"):
        load_model(ckpt_copy)


def test_missing_shard_and_missing_dir(tmp_path):
    path = tmp_path / "sharded"
    write_random_checkpoint(PRESETS["tiny-31b"], path, dtype=torch.float32, max_shard_bytes=200_000)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"shard file model-00002-of-\d+\.safetensors .* is missing"):
        load_model(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_existing_output_needs_force(make_checkpoint):
    with pytest.raises(CheckpointError, match="use --force"):
        write_random_checkpoint(PRESETS["tiny-31b"], make_checkpoint("tiny-31b"))


def test_bf16_checkpoint_stores_bf16(tmp_path):
    write_random_checkpoint(PRESETS["tiny-31b"], tmp_path / "b", dtype=torch.bfloat16)
    tensors = _tensors(tmp_path / "b")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert np.isfinite(torch.stack([t.float().abs().max() for t in tensors.values()]).numpy()).all()
