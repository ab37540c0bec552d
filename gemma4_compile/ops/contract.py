"""One frozen contract per `gemma4` custom op, and everything generated from it.

A contract names the op's domain and version, its inputs and outputs (name, type constraint, optional), its
attributes (name, type, default) and the TensorRT plugin it maps to. From it come the ONNX `OpSchema`
(`schema`), the plugin fields the ONNX parser hands a creator (`plugin_fields`: INT narrowed to INT32, FLOAT to
FLOAT32, only for the names the creator lists) and the row of the op table in docs/export-format.md (`doc_row`).
Importing this module needs neither torch nor TensorRT.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import BuildError

if TYPE_CHECKING:
    from onnx.defs import OpSchema

DOMAIN = "gemma4"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "gemma4"
PLUGIN_VERSION = "1"
KERNEL_DOMAIN = "gemma4_ort"  # runners/ort_kernels: onnxruntime CPU kernels of our own, for its runner only

AttrKind = Literal["int", "float", "string"]
_PLUGIN_FIELD_DTYPE = {"int": "int32", "float": "float32"}  # what the ONNX parser narrows INT/FLOAT to


class PluginError(BuildError):
    """A `gemma4` plugin got fields it cannot use, or its registration clashes with another plugin."""


class UnknownOpError(BuildError):
    """An op type that is not a `gemma4` custom op."""


@dataclass(frozen=True)
class TypeConstraint:
    name: str  # "T"
    types: tuple[str, ...]  # ("tensor(float)", ...)
    doc: str


ACTIVATIONS = TypeConstraint("T", ("tensor(float)", "tensor(float16)", "tensor(bfloat16)"), "activations")
LENGTHS = TypeConstraint("I", ("tensor(int64)",), "lengths")
FLOAT32 = TypeConstraint("F", ("tensor(float)",), "fp32 routing weights")
INT32 = TypeConstraint("I", ("tensor(int32)",), "expert ids, counts and offsets")


@dataclass(frozen=True)
class Param:
    """One input or output: its name, its type constraint's name, and its shape in the spec's letters (docs)."""

    name: str
    type: str = "T"
    shape: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Attr:
    name: str
    kind: AttrKind
    doc: str
    default: int | float | str | None = None  # None: required
    plugin_field: bool = (
        True  # handed to the plugin creator (plugin_namespace/version and aot are the parser's)
    )


@dataclass(frozen=True)
class FieldSpec:
    """One plugin field: an ONNX attribute as the parser passes it (`dtype` is the numpy name)."""

    name: str
    dtype: str  # "int32" | "float32"

    @property
    def plugin_type(self) -> str:
        """The `PluginFieldType` member name the parser uses for this attribute."""
        return {"int32": "INT32", "float32": "FLOAT32"}[self.dtype]


# TensorRT's parser picks a registered plugin over the local function when these are present.
PLUGIN_ATTRS = (
    Attr("plugin_namespace", "string", "TensorRT plugin namespace", plugin_field=False),
    Attr("plugin_version", "string", "TensorRT plugin version", plugin_field=False),
)


@dataclass(frozen=True)
class OpContract:
    """A `gemma4` custom op: what the ONNX node, its function body, the torch op and the plugins agree on."""

    op_type: str
    doc: str
    inputs: tuple[Param, ...]
    outputs: tuple[Param, ...]
    type_constraints: tuple[TypeConstraint, ...]
    attributes: tuple[Attr, ...]  # in schema order; PLUGIN_ATTRS last
    output_like: tuple[int, ...] | None = None  # output i has the shape and dtype of inputs[output_like[i]]
    exported: bool = True  # False: only the engine builder writes it (MoE stages)
    # which decoder layers (model.config.LayerPlan) hold one node of this op, in layer order (export.json custom_nodes)
    in_layer: Callable[[Any], bool] = lambda plan: True
    domain: str = DOMAIN
    version: int = DOMAIN_VERSION
    plugin_namespace: str = PLUGIN_NAMESPACE
    plugin_version: str = PLUGIN_VERSION

    @property
    def plugin_id(self) -> str:
        return f"{self.plugin_namespace}::{self.op_type}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.outputs)

    def plugin_inputs(self, num_inputs: int | None = None) -> tuple[Param, ...]:
        """The inputs a plugin takes from a node with `num_inputs` inputs: the required ones, then the optional
        ones the node has (attention's block_ids: the 8-input form of 26B/31B exports with images); None: the
        required ones alone. A count the op cannot have is a PluginError."""
        required = sum(not p.optional for p in self.inputs)
        n = required if num_inputs is None else num_inputs
        if not required <= n <= len(self.inputs):
            raise PluginError(
                f"{self.plugin_id}: a node has {required} to {len(self.inputs)} inputs, got {num_inputs}"
            )
        return self.inputs[:n]

    def num_io(self, num_inputs: int | None = None) -> int:
        """The plugin's I/O ports: its inputs (`plugin_inputs`), then the outputs."""
        return len(self.plugin_inputs(num_inputs)) + len(self.outputs)

    def int64_inputs(self, num_inputs: int | None = None) -> tuple[int, ...]:
        """Plugin ports of the int64 inputs (every other input is an activation of the first's dtype)."""
        int64 = {c.name for c in self.type_constraints if c.types == ("tensor(int64)",)}
        return tuple(i for i, p in enumerate(self.plugin_inputs(num_inputs)) if p.type in int64)

    def is_int64(self, pos: int, num_inputs: int | None = None) -> bool:
        """Whether I/O position `pos` (inputs first, then outputs) of a node with `num_inputs` inputs carries
        int64 lengths or ids."""
        return pos in self.int64_inputs(num_inputs)

    @property
    def fields(self) -> tuple[FieldSpec, ...]:
        """The plugin fields: the attributes a creator lists, as the ONNX parser narrows them."""
        return tuple(
            FieldSpec(a.name, _PLUGIN_FIELD_DTYPE[a.kind]) for a in self.attributes if a.plugin_field
        )

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def plugin_attributes(self) -> dict[str, str]:
        """The node attributes that make TensorRT's parser pick the plugin over the function body."""
        return {"plugin_namespace": self.plugin_namespace, "plugin_version": self.plugin_version}

    def schema(self) -> OpSchema:
        """The ONNX schema (onnx is imported here only: the contracts themselves need numpy alone)."""
        from onnx.defs import OpSchema

        def attribute(a: Attr) -> OpSchema.Attribute:
            kind = {
                "int": OpSchema.AttrType.INT,
                "float": OpSchema.AttrType.FLOAT,
                "string": OpSchema.AttrType.STRING,
            }[a.kind]
            if a.default is None:
                return OpSchema.Attribute(a.name, kind, a.doc)
            from onnx import helper

            return OpSchema.Attribute(a.name, helper.make_attribute(a.name, a.default), a.doc)

        def formal(p: Param) -> OpSchema.FormalParameter:
            option = (
                OpSchema.FormalParameterOption.Optional
                if p.optional
                else OpSchema.FormalParameterOption.Single
            )
            return OpSchema.FormalParameter(p.name, p.type, param_option=option)

        return OpSchema(
            self.op_type,
            self.domain,
            self.version,
            doc=self.doc,
            inputs=[formal(p) for p in self.inputs],
            outputs=[formal(p) for p in self.outputs],
            type_constraints=[(c.name, list(c.types), c.doc) for c in self.type_constraints],
            attributes=[attribute(a) for a in self.attributes],
        )

    def doc_row(self) -> str:
        """This op's row of the docs/export-format.md op table."""

        def attr(a: Attr) -> str:
            value = {"plugin_namespace": self.plugin_namespace, "plugin_version": self.plugin_version}.get(
                a.name
            )
            if value is not None:
                return f'`{a.name}="{value}"`'
            default = "" if a.default is None else f", default {a.default}"
            return f"`{a.name}` ({a.kind}{default}: {a.doc})"

        def params(ps: Iterable[Param]) -> str:
            return ", ".join(f"{p.name} `{p.shape}`" + (" (optional)" if p.optional else "") for p in ps)

        exported = "yes" if self.exported else "engine build only"
        cells = (
            f"`{self.op_type}`",
            f"`{self.domain}` v{self.version}",
            ", ".join(map(attr, self.attributes)),
            params(self.inputs),
            params(self.outputs),
            exported,
        )
        return "| " + " | ".join(cells) + " |"


# ----- plugin fields as the ONNX parser hands them ------------------------------------------------------


def parse_fields(
    contract: OpContract, received: Iterable[tuple[str, str, np.ndarray]]
) -> dict[str, int | float]:
    """(name, PluginFieldType name, data) as handed to a creator -> {field: python scalar}.

    Strict on purpose: a field of the wrong type means the ONNX attribute has the wrong type, which would
    otherwise turn into a silently wrong window or top-k.
    """
    got = {name: (type_name, np.asarray(data)) for name, type_name, data in received}
    unknown = sorted(set(got) - set(contract.field_names))
    if unknown:
        raise PluginError(f"{contract.plugin_id}: unexpected fields {unknown}")
    values: dict[str, int | float] = {}
    for field in contract.fields:
        if field.name not in got:
            raise PluginError(
                f"{contract.plugin_id}: missing field '{field.name}' (the ONNX node needs a '{field.name}' attribute)"
            )
        type_name, data = got[field.name]
        if type_name != field.plugin_type or data.size != 1:
            raise PluginError(
                f"{contract.plugin_id}: field '{field.name}' must be one {field.plugin_type}, "
                f"got {type_name} with {data.size} values"
            )
        scalar = data.reshape(-1)[0]
        values[field.name] = int(scalar) if field.dtype == "int32" else float(scalar)
    return values


def field_arrays(contract: OpContract, values: dict[str, int | float]) -> list[tuple[str, np.ndarray, str]]:
    """{field: scalar} -> (name, 1-element array, PluginFieldType name), for serialization and creator lists."""
    return [(f.name, np.array([values[f.name]], dtype=f.dtype), f.plugin_type) for f in contract.fields]
