"""Checkpoint -> embed.onnx + decoder.onnx (+ vision.onnx, audio.onnx) + weights.data + export.json.

The model is never materialized: it is built and traced on the meta device, and the weights are streamed
from the safetensors files into one external-data file, so peak memory stays flat in model size.
Everything is written into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from .. import __version__, ops
from ..dtypes import FLOAT_CHOICES, DType
from ..errors import ExportError, Gemma4CompileError
from ..fsutil import atomic_directory, sha256_file
from ..model.audio import Gemma4Audio
from ..model.audio_config import AudioSpec, AudioTokens
from ..model.audio_weights import resolve_audio_weights
from ..model.config import Gemma4Spec
from ..model.model import Gemma4TextModel
from ..model.vision import Gemma4Vision
from ..model.vision_config import ImageTokens, VisionSpec, bidirectional_image_blocks, read_config_json
from ..model.vision_weights import resolve_vision_weights
from ..model.weights import CheckpointReader, PackedEntry, TensorEntry, resolve_text_weights
from ..ops import UnknownOpError
from ..passes import (
    LOWERINGS,
    DequantizeRows,
    DequantizeWeights,
    QuantizeExperts,
    QuantizeMatMuls,
    export_cleanup,
    run_on_proto,
    run_passes,
)
from ..quant.formats import (
    EMBED_ROWS,
    GRAPH_NBITS,
    IMPORTED,
    LM_HEAD,
    QuantRequest,
    QuantSpec,
    plan_imported,
    plan_quant,
    quant_refusal,
)
from ..quant.imported import import_request, parse_import
from . import custom_ops
from .bundle import copy_runtime_files
from .graphs import AudioGraph, DecoderGraph, EmbedGraph, VisionGraph
from .io_spec import (
    AUDIO,
    AUDIO_EMBED_TOKENS,
    AUDIO_TOKENS,
    CLIPS,
    FRAMES,
    IMAGE_TOKENS,
    IMAGES,
    PATCHES,
    SOFT_TOKENS,
    VISION,
    audio_io,
    decoder_io,
    dynamic_shapes,
    embed_io,
    example_tensor,
    vision_io,
)
from .manifest import (
    CACHE_LEN,
    DECODER,
    EMBED,
    SLIDING_SLOTS,
    ExportManifest,
    GraphSpec,
    MultimodalSpec,
    TensorSpec,
    cache_spec,
)
from .weights import DATA_FILE, attach_weights, quantized_weights, write_weight_file

OPSET = 20
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportedModel:
    """The artifact handed to the next stage."""

    path: Path
    manifest: ExportManifest


MODALITIES = ("text", "vision", "audio")


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
    quant: QuantRequest | None = None,
    text_only: bool = False,
    modalities: Collection[str] | None = None,
) -> ExportedModel:
    """Export a Hugging Face Gemma 4 checkpoint (config.json + safetensors) to ONNX.

    `lowering="gqa"` makes an onnxruntime-only variant (see passes/lowerings.py); `quant` a weight-only
    quantized one (see quant/formats.py); `modalities` (MODALITIES; None: every tower the checkpoint has) which
    towers get graphs; `text_only` is `modalities={"text"}`."""
    if dtype not in FLOAT_CHOICES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose one of {', '.join(FLOAT_CHOICES)}")
    spec = Gemma4Spec.from_pretrained(checkpoint_dir)
    config = read_config_json(checkpoint_dir)  # for what the text spec does not carry
    imported = parse_import(config)  # a pre-quantized checkpoint: its codes are exported as stored
    check_quant(quant, spec)
    if imported is not None:
        quant = import_request(quant, imported)
    # None: no such tower (or not asked for); with neither, the text graphs only
    vision, audio = _towers(checkpoint_dir, {"text"} if text_only else modalities)
    multimodal = _multimodal(config, spec, vision, audio) if vision is not None else None
    reader = CheckpointReader(checkpoint_dir)
    entries = resolve_text_weights(reader, spec, imported)
    if vision is not None:
        entries.update(resolve_vision_weights(reader, vision))
    if audio is not None:
        entries.update(resolve_audio_weights(reader, audio))
    return export_spec(
        spec,
        out_dir,
        dtype=dtype,
        entries=entries,
        max_seq_len=max_seq_len,
        force=force,
        debug=debug,
        lowering=lowering,
        progress=progress,
        checkpoint=Path(checkpoint_dir).resolve(),
        vision=vision,
        audio=audio,
        quant=quant,
        multimodal=multimodal,
    )


def _towers(
    checkpoint_dir: str | Path, modalities: Collection[str] | None
) -> tuple[VisionSpec | None, AudioSpec | None]:
    """The vision and audio towers to export (None: left out), refusing an impossible choice in one line."""
    have = {
        "vision": VisionSpec.from_pretrained(checkpoint_dir),
        "audio": AudioSpec.from_pretrained(checkpoint_dir),
    }
    if modalities is None:
        return have["vision"], have["audio"]
    wanted = set(modalities)
    unknown = sorted(wanted - set(MODALITIES))
    if unknown or "text" not in wanted:
        why = f"unknown modality {unknown[0]!r}" if unknown else "text is always exported"
        raise ExportError(
            f"--modalities {','.join(sorted(wanted))}: {why}; choose from {', '.join(MODALITIES)}"
        )
    missing = [m for m in ("vision", "audio") if m in wanted and have[m] is None]
    if missing:
        raise ExportError(f"--modalities {missing[0]}: the checkpoint has no {missing[0]} tower")
    if "audio" in wanted and "vision" not in wanted:  # the embed graph merges audio beside images only
        raise ExportError("--modalities audio needs vision too in this version (the embed graph merges both)")
    return (have["vision"] if "vision" in wanted else None, have["audio"] if "audio" in wanted else None)


def _multimodal(
    config: dict, spec: Gemma4Spec, vision: VisionSpec, audio: AudioSpec | None = None
) -> MultimodalSpec:
    tokens = ImageTokens.from_hf_dict(config)
    if tokens.pad != spec.pad_token_id:
        raise ExportError(f"pad token id {tokens.pad} != the text config's {spec.pad_token_id}")
    blocks = bidirectional_image_blocks(config, spec.attention_k_eq_v)
    return MultimodalSpec(vision, tokens, blocks, audio=AudioTokens.from_hf_dict(config) if audio else None)


def check_quant(quant: QuantRequest | None, spec: Gemma4Spec) -> None:
    """Refuse an impossible --quant in one line (ExportError) before any work."""
    if quant is not None:
        refusal = quant_refusal(quant)
        if refusal:
            raise ExportError(refusal)


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
    vision: VisionSpec | None = None,
    quant: QuantRequest | None = None,
    audio: AudioSpec | None = None,
    multimodal: MultimodalSpec | None = None,
) -> ExportedModel:
    """Export a spec; without `entries` only the graphs are written (weights laid out but not copied).

    With `vision` / `audio`, the export also holds that tower's graph (role "vision" / "audio"); with vision the
    embed graph merges its soft tokens (`multimodal`: the prompt's token ids; default transformers' ids and the
    spec's family)."""
    if vision is not None and multimodal is None:
        multimodal = _multimodal({"text_config": {"pad_token_id": spec.pad_token_id}}, spec, vision, audio)
    check_quant(quant, spec)
    out = Path(out_dir)
    if out.exists() and not force:
        raise ExportError(f"output directory {out} already exists (use --force to replace it)")
    max_seq_len = max_seq_len or spec.max_position_embeddings
    if max_seq_len < 1:
        raise ExportError(f"--max-seq-len must be positive, got {max_seq_len}")
    if lowering not in (None, *LOWERINGS):
        raise ExportError(f"unknown lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
    if lowering and multimodal is not None and multimodal.bidirectional_image_blocks:
        raise ExportError(
            f"--lowering {lowering} cannot express the image-block mask of this checkpoint's sliding layers "
            "(26B/31B with a vision tower); export without it, or with --modalities text"
        )
    with atomic_directory(out, ExportError, force=force, inputs=[checkpoint] if checkpoint else []) as tmp:
        _export_into(
            tmp,
            spec,
            entries,
            dtype,
            max_seq_len,
            debug,
            lowering,
            progress or (lambda s: None),
            checkpoint,
            multimodal,
            quant if quant is not None and quant.enabled else None,
            audio,
        )
    manifest = ExportManifest.load(out)
    return ExportedModel(out, manifest)


@dataclass(frozen=True)
class GraphProducer:
    """One graph of the export: the module traced, its I/O spec, and an optional edit of the saved proto."""

    role: str
    module: torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    edit: Callable[[onnx.ModelProto], object] | None = None

    @property
    def file(self) -> str:
        return f"{self.role}.onnx"


def _producers(
    model: Gemma4TextModel,
    dtype: DType,
    debug: bool,
    lowering: str | None,
    vision: Gemma4Vision | None = None,
    audio: Gemma4Audio | None = None,
    multimodal: MultimodalSpec | None = None,
) -> list[GraphProducer]:
    """The export's graphs in pipeline order; adding a graph is adding its producer here."""
    spec = model.spec
    edit = (lambda proto: run_on_proto(proto, [LOWERINGS[lowering].make(spec)])) if lowering else None
    vision_graphs = (
        [GraphProducer(VISION, VisionGraph(vision), *vision_io(vision.spec, dtype))] if vision else []
    )
    audio_graphs = [GraphProducer(AUDIO, AudioGraph(audio), *audio_io(audio.spec, dtype))] if audio else []
    image_id = multimodal.tokens.image if vision and multimodal else None
    blocks = image_id is not None and multimodal.bidirectional_image_blocks  # the decoder takes mm_block_ids
    audio_id = multimodal.audio.audio if image_id and audio and multimodal.audio else None
    embed = EmbedGraph(model, image_id, audio_id)
    return [
        *vision_graphs,  # first: their soft tokens feed the embedding stage
        *audio_graphs,
        GraphProducer(
            EMBED, embed, *embed_io(spec, dtype, images=image_id is not None, audio=audio_id is not None)
        ),
        GraphProducer(
            DECODER, DecoderGraph(model, debug, blocks), *decoder_io(spec, dtype, debug, blocks), edit=edit
        ),
    ]


def _export_into(
    tmp: Path,
    spec: Gemma4Spec,
    entries: dict[str, TensorEntry] | None,
    dtype: str,
    max_seq_len: int,
    debug: bool,
    lowering: str | None,
    progress: Progress,
    checkpoint: Path | None,
    multimodal: MultimodalSpec | None = None,
    quant_request: QuantRequest | None = None,
    audio: AudioSpec | None = None,
) -> ExportManifest:
    act = DType.parse(dtype)
    vision = multimodal.vision if multimodal else None
    if multimodal is not None and audio is None:  # no audio graph: its prompt ids would promise one
        multimodal = replace(multimodal, audio=None)
    with torch.device("meta"):
        model = Gemma4TextModel(spec).to(act.torch)
        vision_model = Gemma4Vision(vision).to(act.torch) if vision else None
        audio_model = Gemma4Audio(audio).to(act.torch) if audio else None
    model.reset_rope_buffers()
    producers = _producers(model, act, debug, lowering, vision_model, audio_model, multimodal)
    traced = {}
    for p in producers:
        progress(f"trace {p.role} graph")
        traced[p.role] = _trace(p.module, p.inputs, p.outputs)
    progress("write weights" if entries is not None else "lay out weights (graph only)")
    names = {n: n.removeprefix("model.") for g in traced.values() for n in g.graph.initializers}
    computed = {k: v for k, v in model.rope_buffers().items()}
    # our names of every module traced; all use checkpoint names, and the towers' never clash with the text's
    state = {**model.state_dict()}
    for tower in (vision_model, audio_model):
        state.update(tower.state_dict() if tower else {})
    params = set(state)  # everything else the exporter lifted (scalars) carries real data
    used = {names[n] for g in traced.values() for n in g.graph.initializers} & params - set(computed)
    layout = entries if entries is not None else _meta_entries(state, used)
    layout = {n: layout[n] for n in used}
    quant = None
    graph_names = {role: names for role in traced}
    if quant_request is not None:
        quant, layout, maps = _plan_quant(quant_request, traced, names, layout, act)
        graph_names.update(maps)
    placed = write_weight_file(tmp, layout, act.torch, write_data=entries is not None, quant=quant)
    for role, graph in traced.items():
        attach_weights(graph, graph_names[role], placed, act.torch, tmp, computed)
    if quant is not None:
        weights = quantized_weights(
            traced[DECODER], graph_names[DECODER], placed, tmp, quant.accuracy_level, act.torch
        )
        traced[DECODER] = run_passes(traced[DECODER], _quant_passes(quant, weights))
        rows = quantized_weights(traced[EMBED], graph_names[EMBED], placed, tmp, 0, act.torch)
        if rows:
            traced[EMBED] = run_passes(traced[EMBED], [DequantizeRows(rows)])
    progress("save graphs")
    for p in producers:
        check = entries is not None and (
            quant is None or quant.graph != GRAPH_NBITS or p.role != DECODER
        )  # onnx has no com.microsoft schemas
        _save(traced[p.role], tmp / p.file, check=check, edit=p.edit)
    copy_runtime_files(checkpoint, tmp)  # tokenizer, chat template, generation config (hashed below)
    progress("hash files")
    files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
    graphs = {
        p.role: GraphSpec(p.role, p.file, files[p.file], [DATA_FILE], p.inputs, p.outputs) for p in producers
    }
    manifest = ExportManifest(
        path=tmp,
        dtype=act.value,
        opset=max(
            g.opset_imports.get("", OPSET) for g in traced.values()
        ),  # 21 with DequantizeLinear weights
        max_seq_len=max_seq_len,
        spec=spec,
        graphs=graphs,
        caches=[cache_spec(spec, plan) for plan in spec.cache_layers],
        custom_nodes=_custom_nodes(tmp / graphs[DECODER].file, spec),
        files=files,
        tools=_tool_versions(),
        debug=debug,
        weights=entries is not None,
        lowering=lowering,
        checkpoint=str(checkpoint) if checkpoint else None,
        dims={
            "batch": "dynamic",
            "sequence": "dynamic",
            SLIDING_SLOTS: spec.sliding_window,
            CACHE_LEN: f"dynamic, >= past_len + sequence, <= {max_seq_len}",
            **(_vision_dims(vision) if vision else {}),
            **(_audio_dims(merged=bool(vision and multimodal.audio)) if audio else {}),
        },
        weight_format=quant.format if quant is not None else act.value,
        quant=quant,
        multimodal=multimodal,
    )
    manifest.save(tmp)
    return manifest


def _plan_quant(
    request: QuantRequest,
    traced: dict[str, ir.Model],
    names: dict[str, str],
    layout: dict[str, TensorEntry],
    act: DType,
) -> tuple[QuantSpec, dict[str, TensorEntry], dict[str, dict[str, str]]]:
    """The quantization of the export's weights, the writer's entries with the quantized copies of the tied
    embedding (`lm_head` for the decoder, `embed_rows` for the embed graph), and the decoder's and embed graph's
    initializer -> tensor names pointing at those copies."""
    if request.method == IMPORTED:
        packed = {n for n, e in layout.items() if isinstance(e, PackedEntry)}
        if not packed:
            raise ExportError(
                "--quant-method imported needs a pre-quantized checkpoint (none of its weights is packed)"
            )
        source = next(e.source for e in layout.values() if isinstance(e, PackedEntry))
        quant = plan_imported(request, sorted(layout), packed, act.value, source)
    else:
        quant = plan_quant(request, sorted(layout), act.value)
    for role, graph in traced.items():  # the decoder's MatMuls and the embed graph's gathers are rewritten
        readable = set(quant.row_tables) if role == EMBED else set()
        shared = {names[n] for n in graph.graph.initializers} & set(quant.tensors) - readable
        if role != DECODER and shared:
            raise ExportError(f"the {role} graph reads '{min(shared)}', which --quant would quantize")
    tied, maps = "embed_tokens.weight", {DECODER: dict(names), EMBED: dict(names)}
    copies = {role: copy for role, copy in ((DECODER, LM_HEAD), (EMBED, EMBED_ROWS)) if copy in quant.tensors}
    for role, copy in copies.items():
        maps[role].update({i: copy for i, n in names.items() if n == tied})
    layout = {**layout, **{copy: layout[tied] for copy in copies.values()}}
    if len(copies) == 2:
        layout.pop(tied)  # both readers have their own copy: no float table is written
    return quant, layout, maps


def _trace(module: torch.nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> ir.Model:
    args = tuple(example_tensor(t) for t in inputs)
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                optimize=False,
                opset_version=OPSET,
                dynamic_shapes=(tuple(dynamic_shapes(inputs)),),
                input_names=[t.name for t in inputs],
                output_names=[t.name for t in outputs],
                custom_translation_table=custom_ops.translation_table(),
                verbose=False,
            )
    except Gemma4CompileError:
        raise
    except Exception as e:  # the exporter's own failures are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed: {first}") from e
    return run_passes(program.model, export_cleanup())


def _save(
    model: ir.Model, path: Path, check: bool, edit: Callable[[onnx.ModelProto], object] | None = None
) -> None:
    proto = ir.serde.serialize_model(model)
    custom = [n for n in proto.graph.node if n.domain == custom_ops.DOMAIN]
    used = {n.op_type for n in custom}
    blocks = any(n.op_type == custom_ops.attention.OP_TYPE and len(n.input) > 7 for n in custom)
    proto.functions.extend(custom_ops.functions(used, block_ids=blocks))
    _align_function_opsets(proto)
    if used and not any(o.domain == custom_ops.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(custom_ops.DOMAIN, custom_ops.DOMAIN_VERSION))
    proto.producer_name, proto.producer_version = "gemma4-compile", __version__
    proto.doc_string = ""
    for node in proto.graph.node:  # stack traces name local paths; drop them for reproducible bytes
        del node.metadata_props[:]
    if edit is not None:
        edit(proto)
    onnx.save_model(proto, str(path))
    if (
        check and edit is None
    ):  # a lowered graph uses com.microsoft ops onnx has no schemas for (ORT checks it)
        onnx.checker.check_model(str(path), full_check=True)


def _align_function_opsets(proto: onnx.ModelProto) -> None:
    """The ops' bodies are written for opset 20; a graph raised to 21 (DequantizeLinear weights) must have its
    functions import 21 too (the checker's rule). 20 -> 21 only added types (INT4, ...) to the ops they use."""
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    for function in proto.functions:
        for opset in function.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < version:
                opset.version = version


def _vision_dims(vision: VisionSpec) -> dict[str, str]:
    k2 = vision.patches_per_token
    return {
        IMAGES: "dynamic",
        PATCHES: f"dynamic, a multiple of {k2} (one soft token per {k2} patches)",
        SOFT_TOKENS: f"patches / {k2}",
        IMAGE_TOKENS: "dynamic, >= 0: the image placeholders of an embed call (0 for text-only calls)",
    }


def _audio_dims(merged: bool) -> dict[str, str]:
    """`merged`: the embed graph takes the audio rows too (an export with a vision graph as well)."""
    dims = {
        CLIPS: "dynamic",
        FRAMES: "dynamic, 1 to 3000 (30 s of 10 ms log-mel frames)",
        AUDIO_TOKENS: "ceil(ceil(frames / 2) / 2) (one soft token per 40 ms)",
    }
    if merged:
        dims[AUDIO_EMBED_TOKENS] = "dynamic, >= 0: the audio placeholders of an embed call (0 without audio)"
    return dims


def _meta_entries(state: dict[str, torch.Tensor], used: set[str]) -> dict[str, TensorEntry]:
    """Shapes only, for graph-only exports of models too large for this machine."""
    return {n: TensorEntry(n, Path(DATA_FILE), 0, 0, state[n].dtype, tuple(state[n].shape)) for n in used}


def _quant_passes(quant: QuantSpec, weights: dict) -> list:
    """The decoder's quantized-weight encoding: DequantizeLinear for TensorRT; for onnxruntime, MatMulNBits per
    linear and per expert (the MoE nodes of quantized experts become If-per-expert, passes/moe_nbits.py)."""
    if quant.graph != GRAPH_NBITS:
        return [DequantizeWeights(weights)]
    experts = {n: w for n, w in weights.items() if w.b.shape.rank() == 4}
    linears = {n: w for n, w in weights.items() if n not in experts}
    return [QuantizeExperts(experts), QuantizeMatMuls(linears)]


def _custom_nodes(decoder_path: Path, spec: Gemma4Spec) -> list[dict]:
    """Every gemma4 node with its layer (an op's nodes appear in layer order, one per layer its contract names)."""
    proto = onnx.load(str(decoder_path), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.domain == custom_ops.DOMAIN]
    layers: dict[str, list] = {}
    out = []
    for node in nodes:
        if node.op_type not in layers:
            try:
                contract = ops.contract(node.op_type)
            except UnknownOpError as e:
                raise ExportError(f"the decoder graph holds an unregistered custom op: {e}") from None
            layers[node.op_type] = [p for p in spec.layers if contract.in_layer(p)]
        if not layers[node.op_type]:
            raise ExportError(
                f"the decoder graph holds more {node.op_type} nodes than the spec has layers for"
            )
        plan = layers[node.op_type].pop(0)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        out.append(
            {
                "name": node.name,
                "op_type": node.op_type,
                "layer": plan.index,
                "kind": plan.kind,
                "attributes": attrs,
            }
        )
    if any(layers.values()):
        raise ExportError("the decoder graph is missing gemma4 custom nodes for some layers")
    return out


def _tool_versions() -> dict[str, str]:
    versions = {"gemma4_compile": __version__}
    for pkg in ("torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    return versions
