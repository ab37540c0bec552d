"""`export --quant`: refusals are one line with exit 1 and write nothing."""

from __future__ import annotations

import pytest

from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_ERROR


@pytest.mark.parametrize(
    "preset,args,message",
    [
        ("tiny-e2b", ["--quant", "fp8"], "--quant fp8 is not supported yet"),
        ("tiny-e2b", ["--quant", "nvfp4"], "--quant nvfp4 is not supported yet"),
        ("tiny-e2b", ["--quant", "int4", "--block-size", "48"], "Invalid value for '--block-size'"),
        ("tiny-26b-a4b", ["--quant", "int8"], "cannot quantize MoE experts yet"),
    ],
)
def test_impossible_quant_is_refused_in_one_line(make_checkpoint, tmp_path, capsys, preset, args, message):
    out = tmp_path / "out"
    assert main(["export", str(make_checkpoint(preset)), "-o", str(out), *args]) == EXIT_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()
