"""Checkpoint -> embed.onnx + decoder.onnx + weights.data + export.json.

The model is never materialized: it is built and traced on the meta device, and the weights are streamed
from the safetensors files into one external-data file, so peak memory stays flat in model size.
Everything is written into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from .. import __version__
from ..errors import ExportError, Gemma4CompileError
from ..fsutil import atomic_directory, sha256_file
from ..model.config import Gemma4Spec
from ..model.model import Gemma4TextModel
from ..model.weights import CheckpointReader, TensorEntry, resolve_text_weights
from . import custom_ops
from .bundle import copy_runtime_files
from .graphs import DecoderGraph, EmbedGraph
from .io_spec import (
    CACHE_LEN,
    SLIDING_SLOTS,
    TORCH_DTYPES,
    TensorSpec,
    cache_names,
    decoder_io,
    dynamic_shapes,
    embed_io,
    example_tensor,
)  # fmt: skip
from .lowering import LOWERINGS, lower_attention_to_gqa
from .manifest import CacheInfo, ExportManifest, GraphInfo
from .passes import clean_up
from .weights import DATA_FILE, attach_weights, write_weight_file

OPSET = 20
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportedModel:
    """The artifact handed to the next stage."""

    path: Path
    manifest: ExportManifest


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    max_seq_len: int | None = None,
    force: bool = False,
    debug: bool = False,
    lowering: str | None = None,
    progress: Progress | None = None,
) -> ExportedModel:
    """Export a Hugging Face Gemma 4 checkpoint (config.json + safetensors) to ONNX.

    `lowering="gqa"` makes an onnxruntime-only variant (see export/lowering.py)."""
    if dtype not in TORCH_DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
    spec = Gemma4Spec.from_pretrained(checkpoint_dir)
    entries = resolve_text_weights(CheckpointReader(checkpoint_dir), spec)
    return export_spec(
        spec, out_dir, dtype=dtype, entries=entries, max_seq_len=max_seq_len, force=force, debug=debug,
        lowering=lowering, progress=progress, checkpoint=Path(checkpoint_dir).resolve(),
    )  # fmt: skip


def export_spec(
    spec: Gemma4Spec,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    entries: dict[str, TensorEntry] | None = None,
    max_seq_len: int | None = None,
    force: bool = False,
    debug: bool = False,
    lowering: str | None = None,
    progress: Progress | None = None,
    checkpoint: Path | None = None,
) -> ExportedModel:
    """Export a spec; without `entries` only the graphs are written (weights laid out but not copied)."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise ExportError(f"output directory {out} already exists (use --force to replace it)")
    max_seq_len = max_seq_len or spec.max_position_embeddings
    if max_seq_len < 1:
        raise ExportError(f"--max-seq-len must be positive, got {max_seq_len}")
    if lowering not in (None, *LOWERINGS):
        raise ExportError(f"unknown lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
    with atomic_directory(out, ExportError) as tmp:
        _export_into(tmp, spec, entries, dtype, max_seq_len, debug, lowering, progress or (lambda s: None), checkpoint)
    manifest = ExportManifest.load(out)
    return ExportedModel(out, manifest)


def _export_into(
    tmp: Path, spec: Gemma4Spec, entries: dict[str, TensorEntry] | None, dtype: str, max_seq_len: int,
    debug: bool, lowering: str | None, progress: Progress, checkpoint: Path | None,
) -> ExportManifest:  # fmt: skip
    torch_dtype = TORCH_DTYPES[dtype]
    with torch.device("meta"):
        model = Gemma4TextModel(spec).to(torch_dtype)
    model.reset_rope_buffers()
    embed_in, embed_out = embed_io(spec, dtype)
    dec_in, dec_out = decoder_io(spec, dtype, debug)
    progress("trace embed graph")
    embed = _trace(EmbedGraph(model), embed_in, embed_out)
    progress("trace decoder graph")
    decoder = _trace(DecoderGraph(model, debug), dec_in, dec_out)
    progress("write weights" if entries is not None else "lay out weights (graph only)")
    names = {n: n.removeprefix("model.") for g in (embed, decoder) for n in g.graph.initializers}
    computed = {k: v for k, v in model.rope_buffers().items()}
    params = set(model.state_dict())  # everything else the exporter lifted (scalars) carries real data
    used = {names[n] for g in (embed, decoder) for n in g.graph.initializers} & params - set(computed)
    layout = entries if entries is not None else _meta_entries(model, used)
    placed = write_weight_file(tmp, {n: layout[n] for n in used}, torch_dtype, write_data=entries is not None)
    for graph in (embed, decoder):
        attach_weights(graph, names, placed, torch_dtype, tmp, computed)
    progress("save graphs")
    graphs = {
        "embed": _save(embed, tmp / "embed.onnx", embed_in, embed_out, check=entries is not None),
        "decoder": _save(decoder, tmp / "decoder.onnx", dec_in, dec_out, check=entries is not None,
                         edit=(lambda proto: lower_attention_to_gqa(proto, spec)) if lowering == "gqa" else None),
    }
    copy_runtime_files(checkpoint, tmp)  # tokenizer, chat template, generation config (hashed below)
    progress("hash files")
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    graphs = {k: GraphInfo(g.file, files[g.file], g.external_data, g.inputs, g.outputs) for k, g in graphs.items()}
    manifest = ExportManifest(
        path=tmp, dtype=dtype, opset=OPSET, max_seq_len=max_seq_len, spec=spec, graphs=graphs,
        caches=_cache_infos(spec), custom_nodes=_custom_nodes(tmp / "decoder.onnx", spec), files=files,
        tools=_tool_versions(), debug=debug, weights=entries is not None, lowering=lowering,
        checkpoint=str(checkpoint) if checkpoint else None,
        dims={"batch": "dynamic", "sequence": "dynamic", SLIDING_SLOTS: spec.sliding_window,
              CACHE_LEN: f"dynamic, >= past_len + sequence, <= {max_seq_len}"},
    )  # fmt: skip
    manifest.save(tmp)
    return manifest


def _trace(module: torch.nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> ir.Model:
    args = tuple(example_tensor(t) for t in inputs)
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, optimize=False, opset_version=OPSET,
                dynamic_shapes=(tuple(dynamic_shapes(inputs)),),
                input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                custom_translation_table=custom_ops.translation_table(), verbose=False,
            )  # fmt: skip
    except Gemma4CompileError:
        raise
    except Exception as e:  # the exporter's own failures are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed: {first}") from e
    return clean_up(program.model)


def _save(
    model: ir.Model, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], check: bool,
    edit: Callable[[onnx.ModelProto], object] | None = None,
) -> GraphInfo:
    proto = ir.serde.serialize_model(model)
    used = {n.op_type for n in proto.graph.node if n.domain == custom_ops.DOMAIN}
    proto.functions.extend(custom_ops.functions(used))
    if used and not any(o.domain == custom_ops.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(custom_ops.DOMAIN, custom_ops.DOMAIN_VERSION))
    proto.producer_name, proto.producer_version = "gemma4-compile", __version__
    proto.doc_string = ""
    for node in proto.graph.node:  # stack traces name local paths; drop them for reproducible bytes
        del node.metadata_props[:]
    if edit is not None:
        edit(proto)
    onnx.save_model(proto, str(path))
    if check and edit is None:  # a lowered graph uses com.microsoft ops onnx has no schemas for (ORT checks it)
        onnx.checker.check_model(str(path), full_check=True)
    return GraphInfo(path.name, "", [DATA_FILE], inputs, outputs)


def _meta_entries(model: Gemma4TextModel, used: set[str]) -> dict[str, TensorEntry]:
    """Shapes only, for graph-only exports of models too large for this machine."""
    state = model.state_dict()
    return {n: TensorEntry(n, Path(DATA_FILE), 0, 0, state[n].dtype, tuple(state[n].shape)) for n in used}


def _cache_infos(spec: Gemma4Spec) -> list[CacheInfo]:
    infos = []
    for plan in spec.cache_layers:
        past, present = cache_names(plan)
        consumers = [p.index for p in spec.layers if p.kv_producer == plan.index]
        infos.append(
            CacheInfo(
                index=plan.cache_index, layer=plan.index, kind=plan.kind, window=plan.window,
                slots=SLIDING_SLOTS if plan.is_sliding else CACHE_LEN, num_kv_heads=plan.num_kv_heads,
                head_dim=plan.head_dim, consumers=consumers, past=list(past), present=list(present),
            )
        )
    return infos


def _custom_nodes(decoder_path: Path, spec: Gemma4Spec) -> list[dict]:
    """Every gemma4 node with its layer (nodes appear in layer order, one Attention per layer)."""
    proto = onnx.load(str(decoder_path), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.domain == custom_ops.DOMAIN]
    layers = {"SlidingWindowAttention": list(spec.layers), "MoE": [p for p in spec.layers if p.moe]}
    out = []
    for node in nodes:
        plan = layers[node.op_type].pop(0)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        out.append({"name": node.name, "op_type": node.op_type, "layer": plan.index, "kind": plan.kind,
                    "attributes": attrs})  # fmt: skip
    if any(layers.values()):
        raise ExportError("the decoder graph is missing gemma4 custom nodes for some layers")
    return out


def _tool_versions() -> dict[str, str]:
    versions = {"gemma4_compile": __version__}
    for pkg in ("torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    return versions
