"""The registry of `gemma4` custom ops: op_type -> its contract and the code that implements it.

The implementations are named by import path ("module:attribute") and imported on first use, so reading the
registry imports neither torch, Triton nor TensorRT, and the plugin packages that import the contracts do not
import back. An op type that is not here is an UnknownOpError (one line), never another op's kernel.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .attention import SLIDING_WINDOW_ATTENTION, SLIDING_WINDOW_ATTENTION_BLOCKS
from .contract import OpContract, UnknownOpError
from .moe import MOE, STAGE_KERNELS, STAGES

_OPS = "gemma4_compile.ops"
_KERNELS = "gemma4_compile.plugins.kernels"


@dataclass(frozen=True)
class OpEntry:
    """One op: its contract, and where its parts live (None: the op has no such part)."""

    contract: OpContract
    body: str | None = None  # ONNX function body and exporter translation (module with function/translation)
    reference: str | None = None  # torch reference, the semantics every other part is tested against
    torch_op: str | None = None  # torch.ops.gemma4.<name>, what the model calls and the exporter translates
    kernel: str | None = None  # torch wrapper over the Triton kernels (what the RTX plugin's enqueue runs)
    aot_kernel: str | None = None  # plugins.aot.KERNELS name of a single-launch op (a QDP's aot_impl)
    plugins: tuple[str, ...] = ()  # "rtx" (Python IPluginV3), "qdp" (full-TensorRT AOT plugin)

    @property
    def op_type(self) -> str:
        return self.contract.op_type


OPS: dict[str, OpEntry] = {
    e.op_type: e
    for e in (
        OpEntry(
            SLIDING_WINDOW_ATTENTION,
            body=f"{_OPS}.attention.body",
            torch_op="attention",
            reference=f"{_OPS}.attention.reference:attention_reference",
            kernel=f"{_KERNELS}.attention:attention",
            aot_kernel="attn_fwd",
            plugins=("rtx", "qdp"),
        ),
        OpEntry(SLIDING_WINDOW_ATTENTION_BLOCKS, aot_kernel="attn_fwd_blocks", plugins=("qdp",)),
        OpEntry(
            MOE,
            body=f"{_OPS}.moe.body",
            torch_op="moe",
            reference=f"{_OPS}.moe.reference:moe_reference",
            kernel=f"{_KERNELS}.moe:moe",
            plugins=("rtx",),
        ),
        *(OpEntry(c, aot_kernel=k, plugins=("qdp",)) for c, k in zip(STAGES, STAGE_KERNELS, strict=True)),
    )
}


def entry(op_type: str) -> OpEntry:
    """The registry entry of a `gemma4` op type, or UnknownOpError naming the known ones."""
    try:
        return OPS[op_type]
    except KeyError:
        raise UnknownOpError(f"no gemma4 op named '{op_type}'; known: {', '.join(OPS)}") from None


def contract(op_type: str) -> OpContract:
    return entry(op_type).contract


def with_plugin(kind: str) -> list[OpEntry]:
    """The ops that have a `kind` plugin ('rtx' or 'qdp'), in registry order."""
    return [e for e in OPS.values() if kind in e.plugins]


def exported() -> list[OpEntry]:
    """The ops an export may contain (each with an ONNX function body)."""
    return [e for e in OPS.values() if e.contract.exported]


def resolve(path: str) -> Any:
    """'package.module:attribute' (or just a module) -> the object, imported now."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def part(op_type: str, name: str) -> Any:
    """One part of an op ('body', 'reference', 'kernel'), imported; UnknownOpError when the op has none."""
    path = getattr(entry(op_type), name)
    if path is None:
        raise UnknownOpError(f"gemma4 op '{op_type}' has no {name}")
    return resolve(path)
