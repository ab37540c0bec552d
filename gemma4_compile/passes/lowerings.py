"""The lowerings an export can be made with (`gemma4-compile export --lowering NAME`): one table.

The CLI's choice list, the exporter and the runners all read `LOWERINGS`. Importing this module imports neither
torch nor a pass: a lowering's pass is built only when an export asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir

    from ..model.config import Gemma4Spec


@dataclass(frozen=True)
class Lowering:
    name: str
    description: str  # one line, for --help and the report
    make: Callable[[Gemma4Spec], ir.passes.PassBase]  # the pass that lowers a decoder of this spec
    # (batch, new tokens, cache non-empty) -> why a runner cannot run that step on a lowered export, or None
    refusal: Callable[[int, int, bool], str | None] = lambda batch, seq, cached: None


def _gqa(spec: Gemma4Spec) -> ir.passes.PassBase:
    from .lower_gqa import LowerAttentionToGQA

    return LowerAttentionToGQA(spec)


def _gqa_refusal(batch: int, seq: int, cached: bool) -> str | None:
    if batch > 1 and seq > 1 and cached:
        return (
            "a gqa-lowered export cannot prefill a batch on top of a non-empty cache "
            "(onnxruntime GroupQueryAttention); use a plain export"
        )
    return None


LOWERINGS: dict[str, Lowering] = {
    "gqa": Lowering(
        "gqa",
        "onnxruntime-only variant: attention through com.microsoft.GroupQueryAttention (faster on ORT)",
        _gqa,
        _gqa_refusal,
    ),
}


def lowering_refusal(name: str | None, batch: int, seq: int, cached: bool) -> str | None:
    """Why an export made with lowering `name` (None: none) cannot run this step, or None when it can."""
    return None if name is None else LOWERINGS[name].refusal(batch, seq, cached)
