"""`export --quant`: refusals are one line with exit 1 and write nothing."""

from __future__ import annotations

import pytest

from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_ERROR


@pytest.mark.parametrize(
    "preset,args,message",
    [
        ("tiny-e2b", ["--quant", "nvfp4", "--block-size", "64"], "fixed by the format"),
        ("tiny-e2b", ["--quant-override", "lm_head=int4"], "--quant-override needs --quant"),
        ("tiny-e2b", ["--quant", "int4", "--quant-override", "embed=int4"], "gathered table"),
        ("tiny-e2b", ["--quant", "int4", "--block-size", "48"], "Invalid value for '--block-size'"),
        ("tiny-e2b", ["--quant", "nvfp4", "--quant-method", "mse"], "applies to int4/int8"),
    ],
)
def test_impossible_quant_is_refused_in_one_line(make_checkpoint, tmp_path, capsys, preset, args, message):
    out = tmp_path / "out"
    assert main(["export", str(make_checkpoint(preset)), "-o", str(out), *args]) == EXIT_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


# --quant-keep embed: the tied table stays float for the embed graph while the LM head gets its int8 copy
@pytest.mark.parametrize(
    "fmt,dtype,keep", [("int4", "fp32", ()), ("nvfp4", "fp16", ()), ("int8", "fp32", ("embed",))]
)
def test_inspect_quant_sizes_are_the_bytes_the_export_writes(make_quant_export, fmt, dtype, keep):
    """`inspect --quant` predicts, before any work, the bytes each role gets in weights.data: codes + scales of
    the quantized ones (the decoder's MatMul weights, the embed graph's int8 tables), the float ones as is."""
    from quant_support import written_by_role

    from gemma4_compile.model.presets import get_preset
    from gemma4_compile.quant.formats import QuantRequest
    from gemma4_compile.quant.sizes import plan_sizes

    plan = plan_sizes(get_preset("tiny-e2b"), QuantRequest(fmt, keep=keep), dtype)
    predicted = {r.role: r.after for r in plan.rows if r.after}
    assert predicted == written_by_role(make_quant_export("tiny-e2b", fmt, keep=keep, dtype=dtype))
    assert {"attn_q", "lm_head", "embed", "ple_table", "ple_proj"} <= set(predicted)
    embed = next(r for r in plan.rows if r.role == "embed")
    kept = (embed.format, embed.after) == (dtype, embed.before)
    assert kept == bool(keep)


def test_inspect_quant_prints_a_row_per_role(make_checkpoint, capsys):
    args = ["inspect", str(make_checkpoint("tiny-e2b")), "--quant", "fp8", "--quant-override", "lm_head=int4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "--quant fp8 at fp32 (DequantizeLinear, min sm89)" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert {"attn_q", "mlp_down", "lm_head", "embed", "ple_table", "total"} <= set(rows)
    assert "fp8" in rows["attn_q"] and "int4" in rows["lm_head"] and "int8" in rows["ple_table"]
    assert "fp32" in rows["ple_proj"]


def test_a_prequantized_checkpoint_is_named_and_refused(make_checkpoint, tmp_path, capsys):
    """Not re-rounded, not read as floats: one line naming its quantization_config, nothing written."""
    import json
    import shutil

    ckpt = tmp_path / "awq"
    shutil.copytree(make_checkpoint("tiny-e2b"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "-o", str(out)]) == EXIT_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "quant_method=awq, bits=4, group_size=128" in lines[0], lines
    assert not out.exists()
