"""Helpers the quantization tests share (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import re

import numpy as np


def swap_nibbles(raw: np.ndarray) -> np.ndarray:
    """The packing bug a layout change makes: the two 4-bit codes of every byte trade places."""
    return (raw >> 4) | (raw << 4)


def written_by_role(export) -> dict[str, int]:
    """Role -> bytes in weights.data of the tensors the export's graphs read, from the initializer names
    (`<name>` float, `<name>_Q4|_Q8|_scales` quantized). The tied embedding is `embed` as the embed graph reads
    it and `lm_head` as the decoder does; a float table both read is counted once, as `embed` (as inspect does)."""
    import onnx_ir as ir

    from gemma4_compile.quant.formats import role_of

    seen: set[int] = set()
    out: dict[str, int] = {}
    for graph in ("embed", "decoder"):
        for v in ir.load(export / f"{graph}.onnx").graph.initializers.values():
            t = v.const_value
            if not isinstance(t, ir.ExternalTensor) or t.offset in seen:
                continue
            seen.add(t.offset)
            stem = re.sub(r"_(Q4|Q8|scales)$", "", v.name.removeprefix("model."))
            tied = stem == "embed_tokens.weight"
            role = ("embed" if graph == "embed" else "lm_head") if tied else role_of(stem)
            if role is not None:
                out[role] = out.get(role, 0) + t.nbytes
    return out
