"""A corrupting copy of a quantized export (make_quant_export is in tests/conftest.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest


@pytest.fixture
def corrupt(reseal, tmp_path):
    """corrupt(export, data_type, fn, suffix="", graph="decoder", contains="") -> a copy of `export` whose `graph`
    initializers of ONNX `data_type` (named ...contains...suffix) have their bytes in weights.data replaced by fn(uint8 bytes), resealed
    as a buggy exporter would have recorded them: the integrity check passes and only the numbers can tell."""

    def make(
        export: Path,
        data_type: int,
        fn: Callable[[np.ndarray], np.ndarray],
        suffix: str = "",
        graph: str = "decoder",
        contains: str = "",
    ) -> Path:
        out = tmp_path / f"broken-{export.name}"
        shutil.copytree(export, out)
        proto = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        hit = 0
        with open(out / "weights.data", "r+b") as f:
            for init in proto.graph.initializer:
                if init.data_type != data_type or not init.name.endswith(suffix) or contains not in init.name:
                    continue
                where = {e.key: e.value for e in init.external_data}
                f.seek(int(where["offset"]))
                raw = np.frombuffer(f.read(int(where["length"])), dtype=np.uint8)
                f.seek(int(where["offset"]))
                f.write(fn(raw).astype(np.uint8).tobytes())
                hit += 1
        assert hit, f"no {onnx.TensorProto.DataType.Name(data_type)} initializer to corrupt"
        reseal(out)
        return out

    return make
