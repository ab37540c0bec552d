"""onnxruntime's optimized graphs saved once and reused, so that a session starts without re-optimizing.

Creating the decoder session spends most of its time inlining the `gemma4::` function bodies and running the
graph optimizers. The first session of an export writes the graph as onnxruntime optimized it
(`optimized_model_filepath`, level EXTENDED: no hardware-specific layout, so the file is portable) with its
weights beside it; later sessions load that file and only run the cheap layout passes on top. Entries are keyed
by the graph's sha256 from export.json (which `ExportManifest.verify` has just checked), the onnxruntime
version, the providers and whether the runner rewrote the graph first (passes/share_shapes.py), and are written
to a temporary folder and renamed, so concurrent starts never see half a file. The cost is disk: a copy of the
graph's weights per entry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..export.manifest import ExportManifest

GRAPH, DATA = "model.onnx", "model.data"
# where a session made from bytes finds the external weights (the graph's own folder when made from a path)
DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def with_data_folder(options: Any, folder: Path) -> Any:
    """`options` for a session created from serialized bytes whose weights live in `folder`."""
    options.add_session_config_entry(DATA_FOLDER, str(folder))
    return options


def cache_key(ort: Any, manifest: ExportManifest, role: str, providers: list[str], rewrite: str = "") -> str:
    """`rewrite`: the tag of the runner's rewrite (runners/ort.py `_rewrite`), empty for the graph as exported."""
    names = "+".join(p.removesuffix("ExecutionProvider").lower() for p in providers)
    tag = f"-{rewrite}" if rewrite else ""
    return f"{manifest.graphs[role].sha256[:24]}-{role}{tag}-ort{ort.__version__}-{names}"


def optimized_graph(
    ort: Any,
    manifest: ExportManifest,
    role: str,
    providers: list[str],
    cache_dir: Path,
    rewrite: Callable[[Path], bytes] | None = None,
    tag: str = "",
    libraries: tuple[Path, ...] = (),
) -> Path:
    """The cached optimized graph of `role`, made now if missing; `rewrite` (graph path -> serialized graph
    whose weights stay in the export folder, named by `tag` in the key) runs before onnxruntime's optimizers,
    and only on a miss. `libraries`: custom-op libraries the rewritten graph needs (runners/ort_kernels)."""
    folder = Path(cache_dir) / cache_key(ort, manifest, role, providers, tag if rewrite else "")
    if (folder / GRAPH).is_file():
        return folder / GRAPH
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        path, options = manifest.graph_path(role), _save_options(ort, tmp)
        for library in libraries:
            options.register_custom_ops_library(str(library))
        if rewrite is None:
            ort.InferenceSession(str(path), options, providers=providers)
        else:
            ort.InferenceSession(rewrite(path), with_data_folder(options, path.parent), providers=providers)
        os.rename(tmp, folder)
    except OSError:  # another process renamed its copy first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / GRAPH


def _save_options(ort: Any, folder: Path) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / GRAPH)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    return options
