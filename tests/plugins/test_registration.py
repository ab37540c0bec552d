"""The `gemma4` plugin contract, explicit idempotent registration and the plugin fingerprint.

Registration with TensorRT-RTX runs in a subprocess (this file is its script): the plugin registry is
process-wide, and no test may leave plugins registered in the pytest process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gemma4_compile.errors import BackendUnavailable
from gemma4_compile.plugins import registration
from gemma4_compile.plugins.registration import (
    ATTENTION,
    MOE,
    SPECS,
    PluginError,
    field_arrays,
    parse_fields,
    plugin_fingerprint,
    register_plugins,
    spec_for,
)

RESULT = "RESULT "


# ----- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.op_type)
def test_specs_match_the_exporters_onnx_schema(spec):
    """Field names and the parser's INT->INT32 / FLOAT->FLOAT32 narrowing, against export/custom_ops."""
    from onnx.defs import OpSchema

    from gemma4_compile import ops
    from gemma4_compile.export import custom_ops

    schema = ops.part(spec.op_type, "body").SCHEMA
    assert (schema.domain, custom_ops.PLUGIN_NAMESPACE, custom_ops.PLUGIN_VERSION) == (
        "gemma4",
        "gemma4",
        "1",
    )
    assert tuple(p.name for p in schema.inputs) == spec.input_names
    assert tuple(p.name for p in schema.outputs) == spec.output_names
    narrowed = {OpSchema.AttrType.INT: "int32", OpSchema.AttrType.FLOAT: "float32"}
    attrs = {name: a.type for name, a in schema.attributes.items()}
    assert {f.name: f.dtype for f in spec.fields} == {
        n: narrowed[t] for n, t in attrs.items() if n not in ("plugin_namespace", "plugin_version")
    }
    assert {"plugin_namespace", "plugin_version"} <= set(attrs)


def test_spec_for_names_the_known_ops():
    assert spec_for("MoE") is MOE
    with pytest.raises(
        PluginError, match=r"no gemma4 plugin named 'Softcap'; known: \['SlidingWindowAttention', 'MoE'\]"
    ):
        spec_for("Softcap")


def test_parse_fields_reads_parser_fields():
    received = [
        ("window", "INT32", np.array([512], np.int32)),
        ("scale", "FLOAT32", np.array([0.25], np.float32)),
    ]
    values = parse_fields(ATTENTION, received)
    assert values == {"window": 512, "scale": 0.25}
    assert type(values["window"]) is int and type(values["scale"]) is float


WINDOW_8 = ("window", "INT32", np.array([8], np.int32))
SCALE_1 = ("scale", "FLOAT32", np.array([1.0], np.float32))


@pytest.mark.parametrize(
    ("received", "message"),
    [
        ([SCALE_1], r"missing field 'window' \(the ONNX node needs"),
        (
            [("window", "INT64", np.array([8])), SCALE_1],
            "field 'window' must be one INT32, got INT64 with 1 values",
        ),
        (
            [("window", "INT32", np.array([8, 8], np.int32)), SCALE_1],
            "must be one INT32, got INT32 with 2 values",
        ),
        (
            [WINDOW_8, SCALE_1, ("softcap", "FLOAT32", np.array([50.0], np.float32))],
            r"unexpected fields \['softcap'\]",
        ),
    ],
    ids=["missing", "int64", "array", "extra"],
)
def test_parse_fields_refuses_what_it_cannot_use(received, message):
    with pytest.raises(PluginError, match=message):
        parse_fields(ATTENTION, received)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.op_type)
def test_serialized_fields_parse_back(spec):
    values = {f.name: (3 if f.dtype == "int32" else 0.125) for f in spec.fields}
    arrays = field_arrays(spec, values)
    assert [(a.dtype.name, a.shape) for _, a, _ in arrays] == [(f.dtype, (1,)) for f in spec.fields]
    assert parse_fields(spec, [(name, type_name, data) for name, data, type_name in arrays]) == values


def test_register_plugins_refuses_other_modules():
    with pytest.raises(
        BackendUnavailable, match="expected the 'tensorrt' or 'tensorrt_rtx' module, got 'numpy'"
    ):
        register_plugins(np)


# ----- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_covers_every_plugin_source_including_kernels():
    names = {p.relative_to(registration.PLUGIN_DIR).as_posix() for p in registration.plugin_sources()}
    assert {"rtx.py", "qdp.py", "registration.py", "__init__.py"} <= names
    assert any(n.startswith("kernels/") for n in names)
    assert plugin_fingerprint() == plugin_fingerprint()
    assert len(plugin_fingerprint()) == 64 and int(plugin_fingerprint(), 16) >= 0


def test_fingerprint_changes_with_content_and_with_names(tmp_path, monkeypatch):
    copy = tmp_path / "plugins"
    shutil.copytree(registration.PLUGIN_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(registration, "PLUGIN_DIR", copy)
    base = plugin_fingerprint()
    kernel = next((copy / "kernels").glob("*.py"))
    kernel.write_text(kernel.read_text() + "\n# tuned\n")
    edited = plugin_fingerprint()
    kernel.rename(kernel.with_name("renamed_" + kernel.name))
    renamed = plugin_fingerprint()
    assert len({base, edited, renamed}) == 3
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "stale.py").write_text("x = 1\n")
    assert plugin_fingerprint() == renamed  # caches do not count


# ----- registration with TensorRT-RTX (subprocess) ----------------------------------------------


def _creators_in_namespace(trt) -> list[tuple[str, str]]:
    return sorted(
        (c.name, type(c).__name__)
        for c in trt.get_plugin_registry().all_creators
        if c.plugin_namespace == "gemma4"
    )


def _child(scenario: str) -> dict:
    before = set(sys.modules)
    import tensorrt_rtx as trt

    if scenario == "import-only":
        import gemma4_compile.plugins.qdp
        import gemma4_compile.plugins.rtx  # noqa: F401

        return {
            "creators": _creators_in_namespace(trt),
            "imported_tensorrt": "tensorrt" in set(sys.modules) - before,
        }
    if scenario == "twice":
        first, second = register_plugins(trt), register_plugins(trt)
        return {"first": first, "second": second, "creators": _creators_in_namespace(trt)}
    if scenario == "conflict":
        foreign = ForeignCreator(trt)
        trt.get_plugin_registry().register_creator(foreign, "gemma4")
    try:
        return {"ids": register_plugins(trt)}
    except (BackendUnavailable, PluginError) as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


def ForeignCreator(trt):  # a creator class has to subclass this trt module's interface
    class Foreign(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = "MoE", "gemma4", "1"
            self.field_names = trt.PluginFieldCollection([])

    return Foreign()


def run_child(tmp_path, scenario: str, alias: bool = True) -> dict:
    from gemma4_compile.plugins import rtx

    env = (
        rtx.parser_library_env(tmp_path / "lib")
        if alias
        else {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    )
    proc = subprocess.run(
        [sys.executable, __file__, scenario], env=env, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len(RESULT) :])


@pytest.mark.rtx
def test_importing_the_plugin_modules_registers_nothing(tmp_path):
    result = run_child(tmp_path, "import-only")
    assert result == {"creators": [], "imported_tensorrt": False}


@pytest.mark.rtx
def test_register_plugins_is_explicit_and_idempotent_on_rtx(tmp_path):
    result = run_child(tmp_path, "twice")
    assert result["first"] == result["second"] == ["gemma4::SlidingWindowAttention", "gemma4::MoE"]
    assert result["creators"] == [
        ["MoE", "Gemma4PluginCreator"],
        ["SlidingWindowAttention", "Gemma4PluginCreator"],
    ]


@pytest.mark.rtx
def test_register_plugins_refuses_a_foreign_creator_of_the_same_name(tmp_path):
    result = run_child(tmp_path, "conflict")
    assert result == {
        "error": "PluginError",
        "message": "gemma4::MoE is already registered by Foreign, not by gemma4_compile",
    }


@pytest.mark.rtx
def test_register_plugins_refuses_rtx_whose_parser_would_abort(tmp_path):
    import tensorrt_rtx  # noqa: F401  (maps the library)

    from gemma4_compile.plugins import rtx

    loaded = rtx.loaded_library()
    if loaded is not None and (loaded.parent / rtx.PARSER_LIBRARY).exists():
        pytest.skip(f"{loaded.parent} already has {rtx.PARSER_LIBRARY}")
    result = run_child(tmp_path, "plain", alias=False)
    assert result["error"] == "BackendUnavailable"
    assert "loads 'libtensorrt_rtx.so' when it imports a plugin node" in result["message"]
    assert f"ln -s {loaded.name} {loaded.parent / rtx.PARSER_LIBRARY}" in result["message"]


if __name__ == "__main__":
    print(RESULT + json.dumps(_child(sys.argv[1])), flush=True)
