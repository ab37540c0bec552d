"""`gemma4::MoE` as seven single-launch plugin nodes, for full TensorRT's AOT plugins.

A `tensorrt.plugin` `aot_impl` launches exactly one kernel, and the MoE needs seven with no grid-wide sync
between them (kernels/moe.py: route, count, offsets, scatter, gate_up, down, combine). The SplitMoE pass
(passes/split_moe.py) rewrites each `gemma4::MoE` node into seven `gemma4::MoE<Stage>` nodes whose tensors are
the kernels' buffers (`kernels.moe.BUFFERS`); qdp.py defines one plugin per stage from the same tables, so
TensorRT allocates the intermediates as ordinary activations and runs the seven launches in order. The engine builder splits only when
the stage plugins are registered (engines/prepare.py); onnxruntime and the inline path keep the fused node.

Every stage node carries `aot=1` (the ONNX parser's switch to a QDP's AOT implementation) and the same int
attributes: `top_k`, `num_experts` (the sort kernels see only expert
ids, not the router's width) and `rows_per_expert`, the routed rows an expert gets at the engine's typical batch
(1 for decode, hundreds for prefill); it picks one GEMM tile for the offsets and both GEMM stages, which must
agree on BLOCK_M.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..errors import BuildError
from ..ops import registry
from ..ops.contract import PLUGIN_NAMESPACE as NAMESPACE
from ..ops.contract import PLUGIN_VERSION as VERSION
from ..ops.contract import OpContract
from ..ops.moe import MOE
from ..ops.moe import STAGES as STAGE_CONTRACTS
from ..targets import GpuTarget

MOE_OP = MOE.op_type
FIELDS = STAGE_CONTRACTS[
    0
].field_names  # int32 fields of every stage plugin: top_k, num_experts, rows_per_expert


@dataclass(frozen=True)
class Stage:
    """One stage: its op contract (node op_type in domain gemma4 = the QDP name) and its aot.KERNELS kernel."""

    contract: OpContract
    kernel: str

    @property
    def op_type(self) -> str:
        return self.contract.op_type

    @property
    def plugin_id(self) -> str:
        return self.contract.plugin_id


STAGES = tuple(Stage(c, registry.entry(c.op_type).aot_kernel) for c in STAGE_CONTRACTS)
# The fused op's I/O by kernel pointer name (the rest are intermediates between stages).
OP_INPUTS = {"X_ptr": 0, "Logits_ptr": 1, "Scale_ptr": 2, "GateUp_ptr": 3, "Down_ptr": 4}
OP_OUTPUT = "Y_ptr"

# Which dims each pointer's shape carries: (dim, axis); I2 = 2I, the gate and up halves of GateUp [E, 2I, H].
_SHAPE_DIMS: dict[str, tuple[tuple[str, int], ...]] = {
    "X_ptr": (("T", 0), ("H", 1)),
    "Logits_ptr": (("T", 0),),
    "GateUp_ptr": (("I2", 1), ("H", 2)),
    "Down_ptr": (("H", 1), ("I", 2)),
    "Ids_ptr": (("T", 0),),
    "BlockCounts_ptr": (("NB", 0),),
    "BlockOffsets_ptr": (("NB", 0),),
    "SortedPairs_ptr": (("N", 0),),
    "PairRows_ptr": (("N", 0),),
    "H_ptr": (("N", 0), ("I", 1)),
    "Out_ptr": (("N", 0), ("H", 1)),
}


@cache
def stage_io(stage: Stage) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input pointers, output pointers) of a stage's kernel, in launch order."""
    from . import aot

    inputs, _, outputs = aot.kernel_io(stage.kernel)
    return tuple(inputs), tuple(outputs)


def stage_for(op_type: str) -> Stage:
    """The stage of a stage op type; UnknownOpError (a BuildError) for an op that is not a gemma4 op."""
    stages = {s.op_type: s for s in STAGES}
    if op_type not in stages:
        raise BuildError(f"'{registry.contract(op_type).op_type}' is not a MoE stage; stages: {list(stages)}")
    return stages[op_type]


def arg_name(pointer: str) -> str:
    """Plugin input name of a kernel pointer: 'SortedPairs_ptr' -> 'sorted_pairs'."""
    stem = pointer.removesuffix("_ptr")
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(stem))


def stage_dims(shapes: Mapping[str, Sequence[Any]], fields: Mapping[str, int]) -> dict[str, Any]:
    """The MoE dims (kernels.moe.launch_dims letters) from a stage's input shapes (ints or shape expressions)
    and its fields. A stage sees only some tensors; kernels.moe.complete_dims derives the rest."""
    from .kernels.moe import complete_dims

    dims: dict[str, Any] = {}
    for pointer, shape in shapes.items():
        for dim, axis in _SHAPE_DIMS.get(pointer, ()):
            dims.setdefault(dim, shape[axis])
    if "I2" in dims:
        dims.setdefault("I", dims.pop("I2") // 2)
    return complete_dims(dims, int(fields["top_k"]), int(fields["num_experts"]))


def stage_outputs(stage: Stage, dims: Mapping[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(shape, kind) of each output: kind 'f32', 'i32' or 'act' (the activations' dtype)."""
    from .kernels.moe import BUFFERS

    return [(BUFFERS[p][0](dims), BUFFERS[p][1]) for p in stage_io(stage)[1]]


def pointer_kind(stage: Stage, pointer: str) -> str:
    """'act', 'f32' or 'i32': the element type aot.py compiles a pointer for ('{dtype}' = activations)."""
    from . import aot

    elem = aot.KERNELS[stage.kernel].pointers[pointer]
    return {"{dtype}": "act", "fp32": "f32", "i32": "i32"}[elem]


def stage_config(
    stage: Stage, fields: Mapping[str, int], dtype: str, target: GpuTarget
) -> tuple[str, dict[str, Any], int, int]:
    """(kernel dtype, constexprs, num_warps, num_stages) of a stage on a target, activations in `dtype` ('bf16',
    ...): the tile `gemma4-compile kernels` compiles for the same fields (kernels.configs.moe_stage_variants)."""
    from .kernels.configs import moe_stage_variants

    variants = moe_stage_variants(
        target, dtype, int(fields["num_experts"]), int(fields["top_k"]), int(fields["rows_per_expert"])
    )
    _, kdtype, constexprs, warps, stages = variants[stage.kernel]
    return kdtype, constexprs, warps, stages


def stages_registered(creators: set[tuple[str, str, str]]) -> bool:
    """Whether every stage has a creator (name, version, namespace) in a TensorRT plugin registry."""
    return all((s.op_type, VERSION, NAMESPACE) in creators for s in STAGES)
