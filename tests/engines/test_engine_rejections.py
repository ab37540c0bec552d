"""What TensorRT-RTX refuses, and how it reaches the user: one-line BuildErrors plus a report on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from engines_synthetic import write_synthetic_export

from gemma4_compile.engines import build_engines
from gemma4_compile.errors import BuildError

pytestmark = pytest.mark.rtx


def test_unbuildable_target_fails_before_any_build(fresh_export):
    out = fresh_export("fp16")
    with pytest.raises(
        BuildError, match=r"^cannot build sm90 \(h100, h200, h800, gh200\): TensorRT-RTX"
    ) as info:
        build_engines(out, ["sm89", "h200"], flavour="tensorrt_rtx", progress=False)
    assert "\n" not in str(info.value)
    assert not (out / "engines").exists()  # sm89 was not built either


def test_bf16_on_turing_is_refused_by_the_compiler(fresh_export):
    out = fresh_export("bf16")
    with pytest.raises(BuildError) as info:
        build_engines(out, ["sm75"], max_batch=1, max_seq=16, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("sm75 embed: TensorRT-RTX 1.7")  # the first graph in pipeline order
    assert (
        "Cannot compile for target(s) sm75, because the model contains HW-specific datatypes: b16" in message
    )
    assert "cudaError" not in message  # the no-GPU noise next to the real cause is filtered out
    failed = out / "engines" / "sm75.failed"
    assert str(failed / "embed.capability.json") in message
    assert not (out / "engines" / "sm75").exists()  # nothing that looks like a usable engine
    assert "HW-specific datatypes" in (failed / "embed.build.log").read_text()


def test_a_node_rtx_cannot_import_is_named(tmp_path):
    out = write_synthetic_export(tmp_path / "mystery", "fp16", max_seq_len=16, unsupported=True)
    with pytest.raises(BuildError) as info:
        build_engines(out, ["sm89"], progress=False)
    message = str(info.value)
    assert message.startswith("sm89 decoder: TensorRT-RTX 1.7")
    assert "rejected '/model/mystery/Mystery' (Mystery): INVALID_NODE" in message
    assert "Plugin not found" in message
    report = json.loads((out / "engines" / "sm89.failed" / "capability.json").read_text())
    assert not report["ok"]
    assert [r["node"] for r in report["rejected"]] == ["/model/mystery/Mystery"]
    paths = {n["name"]: n["path"] for n in report["nodes"]}
    assert paths.pop("/model/mystery/Mystery") == "rejected"
    assert set(paths.values()) == {"inlined"}  # the attention nodes before it were inlined


def test_a_failed_rebuild_keeps_the_good_engine(tmp_path):
    out = write_synthetic_export(tmp_path / "export", "fp16", max_seq_len=16)
    (good,) = build_engines(out, ["sm80"], max_batch=1, progress=False)
    before = good.engine_path.read_bytes()
    write_synthetic_export(out, "fp16", max_seq_len=16, unsupported=True)  # a new export that cannot build
    with pytest.raises(BuildError, match="rejected '/model/mystery/Mystery'"):
        build_engines(out, ["sm80"], max_batch=1, progress=False)
    assert good.engine_path.read_bytes() == before and good.manifest_path.is_file()
    assert (out / "engines" / "sm80.failed" / "capability.json").is_file()
    write_synthetic_export(out, "fp16", max_seq_len=16)  # fixed again: a good build clears the failure report
    build_engines(out, ["sm80"], max_batch=1, progress=False)
    assert not (out / "engines" / "sm80.failed").exists()


def test_requested_plugins_register_or_fail_the_build(fresh_export):
    """--plugins means plugins: in this process they either register (nodes become plugins) or the build
    fails naming the fix; it never inlines behind a warning."""
    from gemma4_compile.plugins.rtx import missing_parser_library

    pytest.importorskip("tensorrt_rtx")  # loaded, so missing_parser_library can see where its library is
    out = fresh_export("fp16")
    if missing_parser_library():  # a stock tensorrt-rtx wheel
        with pytest.raises(
            BuildError, match=r"^--plugins: the gemma4 plugins cannot be registered .*Fix: `ln -s"
        ):
            build_engines(out, ["sm89"], plugins=True, max_batch=1, max_seq=16, progress=False)
        return
    (art,) = build_engines(out, ["sm89"], plugins=True, max_batch=1, max_seq=16, progress=False)
    assert "gemma4::SlidingWindowAttention" in art.manifest.plugins["registered"]
    assert art.manifest.capability == {"plugin": 3}


PLUGIN_BUILD = textwrap.dedent(
    """
    import json, sys
    from gemma4_compile.engines import build_engines
    (art,) = build_engines(sys.argv[1], ["sm89"], plugins=True, max_batch=1, max_seq=16, progress=False)
    print(json.dumps({"plugins": art.manifest.plugins, "report": json.loads(art.capability_path.read_text())}))
    """
)


def test_registered_plugins_replace_the_inlined_bodies(fresh_export, tmp_path):
    """The plugin path for real: our IPluginV3 creators registered, so the parser makes PLUGIN_V3 layers.

    Runs in a subprocess whose loader can find libtensorrt_rtx.so (see gemma4_compile.plugins.rtx).
    """
    rtx_plugins = pytest.importorskip("gemma4_compile.plugins.rtx", reason="plugins package not available")
    if not hasattr(rtx_plugins, "parser_library_env"):
        pytest.skip("gemma4_compile.plugins.rtx has no parser_library_env")
    out = fresh_export("fp16")
    env = rtx_plugins.parser_library_env(tmp_path / "lib")
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", PLUGIN_BUILD, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["plugins"]["error"] is None
    assert "gemma4::SlidingWindowAttention" in result["plugins"]["registered"]
    assert result["plugins"]["plugins_sha256"]
    nodes = result["report"]["nodes"]
    assert [n["path"] for n in nodes] == ["plugin"] * 3
    assert all(n["trt_layer_type"] == "PLUGIN_V3" and n["trt_layer"] == n["name"] for n in nodes)
