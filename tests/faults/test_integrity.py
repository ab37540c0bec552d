"""Integrity where artifacts are consumed: `validate`, `bench`, `build` and the runners refuse an export whose
graphs, weights or export.json changed after it was written, in one line naming the file (exit 1); hashes
come from a sidecar cache while the files are untouched; an engine built from another export is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from faults_support import copy_export, reseal

from gemma4_compile import fsutil
from gemma4_compile.cli import main
from gemma4_compile.engines.load import check_built_from
from gemma4_compile.errors import EXIT_ERROR, BuildError, ExportError, RunnerError
from gemma4_compile.export.manifest import MANIFEST, SEAL, ExportManifest
from gemma4_compile.runners.ort import OrtRunner


@pytest.fixture
def export(make_export, tmp_path) -> Path:
    return copy_export(make_export("tiny-e2b"), tmp_path / "export")


def zero_weights(export: Path) -> str:
    path = export / "weights.data"
    path.write_bytes(bytes(path.stat().st_size))
    return "weights.data does not match its sha256"


def edit_decoder(export: Path) -> str:
    path = export / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "decoder.onnx does not match its sha256"


def edit_manifest(export: Path, change) -> None:
    d = json.loads((export / MANIFEST).read_text())
    change(d)
    (export / MANIFEST).write_text(json.dumps(d, indent=2))


def edit_dtype(export: Path) -> str:
    edit_manifest(export, lambda d: d.update(dtype="fp16"))
    return "was edited after export"


def edit_window(export: Path) -> str:
    edit_manifest(export, lambda d: d["spec"].update(sliding_window=d["spec"]["sliding_window"] + 1))
    return "was edited after export"


def edit_dtype_unsealed(export: Path) -> str:
    """Without a seal (an older export) export.json's own consistency still catches the edit."""
    edit_manifest(export, lambda d: (d.pop(SEAL), d.update(dtype="fp16")))
    return "dtype 'fp16' but graphs.decoder input inputs_embeds is float32"


def edit_window_unsealed(export: Path) -> str:
    edit_manifest(export, lambda d: (d.pop(SEAL), d["dims"].update(sliding_cache_len=9)))
    return "dims.sliding_cache_len is 9 but spec.sliding_window is 8"


def remove_weights(export: Path) -> str:
    (export / "weights.data").unlink()
    return "weights.data is missing (external data of"


DAMAGE = [
    zero_weights,
    edit_decoder,
    edit_dtype,
    edit_window,
    edit_dtype_unsealed,
    edit_window_unsealed,
    remove_weights,
]
VERBS = {
    "validate": lambda e: ["validate", str(e), "--steps", "2"],
    "bench": lambda e: ["bench", str(e)],
    "build": lambda e: ["build", str(e), "--target", "sm89"],
    "generate": lambda e: ["generate", str(e), "--prompt", "hi", "--max-new-tokens", "1"],
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("verb", list(VERBS))
def test_a_changed_export_is_refused_where_it_is_consumed(verb, damage, export, capsys):
    expected = damage(export)
    assert main(VERBS[verb](export)) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


@pytest.mark.parametrize("damage", [zero_weights, edit_decoder, edit_dtype])
def test_the_runner_refuses_a_changed_export(damage, export):
    OrtRunner(export)  # intact: opens
    expected = damage(export)
    with pytest.raises(ExportError, match=expected):
        OrtRunner(export)


def test_an_intact_export_runs_and_reformatting_export_json_keeps_its_seal(export):
    d = json.loads((export / MANIFEST).read_text())
    (export / MANIFEST).write_text(json.dumps(d, indent=4, sort_keys=True))
    ExportManifest.load(export).verify()
    assert OrtRunner(export).generate(np.array([[1, 2, 3]]), 2).shape == (1, 2)


def count_hashing(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = fsutil.sha256_file
    monkeypatch.setattr(fsutil, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    return hashed


def test_untouched_files_are_not_rehashed(export, monkeypatch):
    m = ExportManifest.load(export)
    m.verify()
    cache = json.loads((export / fsutil.HASH_CACHE).read_text())
    assert set(cache) == {"embed.onnx", "decoder.onnx", "weights.data"} and fsutil.HASH_CACHE not in m.files
    hashed = count_hashing(monkeypatch)
    m.verify()
    assert hashed == []


def test_a_rewritten_file_is_rehashed_even_with_its_old_mtime(export, monkeypatch):
    import os

    m = ExportManifest.load(export)
    m.verify()
    path = export / "weights.data"
    st = path.stat()
    zero_weights(export)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: the ctime still differs
    hashed = count_hashing(monkeypatch)
    with pytest.raises(ExportError, match="weights.data does not match"):
        m.verify()
    assert hashed == ["weights.data"]


@pytest.mark.parametrize("cache", ["not json", '{"weights.data": 3}', "[]"])
def test_a_broken_cache_is_ignored(cache, export):
    (export / fsutil.HASH_CACHE).write_text(cache)
    ExportManifest.load(export).verify()
    zero_weights(export)
    with pytest.raises(ExportError, match="weights.data does not match"):
        ExportManifest.load(export).verify()


def test_a_read_only_export_is_verified_without_a_cache(export, monkeypatch):
    def refuse(path):  # what writing into a read-only directory does (chmod cannot show it to root)
        raise PermissionError(13, "Permission denied", str(path))

    (export / fsutil.HASH_CACHE).unlink(missing_ok=True)
    monkeypatch.setattr(fsutil, "atomic_file", refuse)
    ExportManifest.load(export).verify()
    assert not (export / fsutil.HASH_CACHE).exists()
    zero_weights(export)
    with pytest.raises(ExportError, match="weights.data does not match"):
        ExportManifest.load(export).verify()


def test_a_corrupted_graph_onnxruntime_cannot_load_is_one_line(export):
    (export / "embed.onnx").write_bytes(b"\x08\x07garbage" * 10)
    reseal(export)  # a buggy exporter: the hashes agree with the damage
    with pytest.raises(RunnerError, match=r"^ort: cannot load .*embed\.onnx: "):
        OrtRunner(export)


def test_an_engine_built_from_another_export_is_refused(tmp_path):
    from types import SimpleNamespace

    engine = SimpleNamespace(export_sha256="a" * 64)
    check_built_from(tmp_path, engine, "a" * 64)
    with pytest.raises(
        BuildError, match=r"built from export aaaaaaaaaaaa, this export is bbbbbbbbbbbb; rebuild"
    ):
        check_built_from(tmp_path, engine, "b" * 64)


def test_opening_an_engine_of_another_export_is_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from gemma4_compile.engines import load

    monkeypatch.setattr(load, "read_manifest", lambda d: SimpleNamespace(export_sha256="a" * 64))
    with pytest.raises(BuildError, match="rebuild with build --force"):
        load.open_engine(tmp_path, None, None, "b" * 64)


@pytest.mark.rtx
def test_the_trt_runner_checks_the_export_and_its_engine(export, monkeypatch):
    """No GPU needed: the checks come before anything touches a TensorRT runtime."""
    from types import SimpleNamespace

    from gemma4_compile.engines import load
    from gemma4_compile.runners import trt

    engine = SimpleNamespace(export_sha256="0" * 64, flavour="tensorrt_rtx", graphs={})
    monkeypatch.setattr(trt, "local_device_sm", lambda: 89)
    monkeypatch.setattr(trt, "read_manifest", lambda d: engine)
    monkeypatch.setattr(load, "read_manifest", lambda d: engine)
    with pytest.raises(
        BuildError, match=r"built from export 000000000000, this export is [0-9a-f]{12}; rebuild"
    ):
        trt.TrtRunner(export, "sm89")
    zero_weights(export)
    with pytest.raises(ExportError, match="weights.data does not match"):
        trt.TrtRunner(export, "sm89")
