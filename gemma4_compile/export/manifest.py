"""`export.json`: everything later stages need to know about an export (see docs/export-format.md).

One loader, `ExportManifest.load`, serves every stage. `lenient=True` takes graphs the exporter did not write
(engine builds of hand-made exports): the spec and the optional fields may be missing, the graphs may not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import DType, weight_format_for
from ..errors import ExportError, Gemma4CompileError
from ..fsutil import EXPORT_FORMAT, EXPORT_MANIFEST, sha256_file, sha256_files
from ..model import audio_preprocess as fe
from ..model.audio_config import AudioTokens
from ..model.config import Gemma4Spec, LayerPlan
from ..model.vision_config import ImageTokens, VisionSpec
from ..quant.formats import QuantSpec

FORMAT, VERSION = EXPORT_FORMAT, 1
MANIFEST = EXPORT_MANIFEST
SEAL = "manifest_sha256"  # sha256 of export.json's canonical JSON without this field (see `seal_of`)
UNSEALED = (SEAL, "checkpoint")  # where the source checkpoint lives is provenance a user may repoint

# The graphs an export holds, by role, in pipeline order; the exporter's producers create them.
EMBED, DECODER, VISION, AUDIO = "embed", "decoder", "vision", "audio"
IMAGE_EMBEDS = "image_embeds"  # the embed graph's soft-token input (exports with a vision graph)
AUDIO_EMBEDS = "audio_embeds"  # and its second one (exports with a vision and an audio graph)
MM_BLOCK_IDS = "mm_block_ids"  # the decoder's image-block input (26B/31B exports with a vision graph)
# Symbolic dims of graph I/O (export.json "dims").
BATCH, SEQUENCE, SLIDING_SLOTS, CACHE_LEN = "batch", "sequence", "sliding_cache_len", "cache_len"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # DType.onnx_name: "float32" | "float16" | "bfloat16" | "int64"
    shape: tuple[int | str, ...]  # ints are fixed; strings name a dim of export.json "dims"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of an export, by role ("vision", "audio", "embed", "decoder")."""

    role: str
    file: str
    sha256: str
    external_data: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "external_data": list(self.external_data),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


@dataclass(frozen=True)
class CacheSpec:
    """The K/V cache of one cache-owning layer, as the decoder graph's past/present tensors."""

    index: int
    layer: int
    kind: str  # "sliding" | "global"
    window: int
    slots_dim: str  # the symbolic dim of the ring size ("sliding_cache_len" | "cache_len"); JSON key "slots"
    num_kv_heads: int
    head_dim: int
    consumers: list[int]
    past: list[str]
    present: list[str]

    def slots(self, max_len: int) -> int:
        """Ring size for sequences of up to `max_len` tokens: exactly W on sliding layers, the full length on
        global ones. The only place this rule lives."""
        return self.window if self.kind == "sliding" else max_len

    def shape(self, batch: int, max_len: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, self.slots(max_len), self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k if k != "slots_dim" else "slots": v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSpec:
        return cls(**{k if k != "slots" else "slots_dim": v for k, v in d.items()})


def cache_names(plan: LayerPlan) -> tuple[tuple[str, str], tuple[str, str]]:
    """(past key, past value), (present key, present value) for a cache-owning layer."""
    n = plan.index
    return (f"past_key_values.{n}.key", f"past_key_values.{n}.value"), (
        f"present.{n}.key",
        f"present.{n}.value",
    )


def cache_spec(spec: Gemma4Spec, plan: LayerPlan) -> CacheSpec:
    """The cache of a cache-owning layer of `spec`."""
    past, present = cache_names(plan)
    return CacheSpec(
        index=plan.cache_index,
        layer=plan.index,
        kind=plan.kind,
        window=plan.window,
        slots_dim=SLIDING_SLOTS if plan.is_sliding else CACHE_LEN,
        num_kv_heads=plan.num_kv_heads,
        head_dim=plan.head_dim,
        consumers=[p.index for p in spec.layers if p.kv_producer == plan.index],
        past=list(past),
        present=list(present),
    )


@dataclass(frozen=True)
class MultimodalSpec:
    """export.json "multimodal": what a runtime needs to build an image (and audio) prompt without the
    checkpoint."""

    vision: VisionSpec  # the tower's spec (patch size, pooling kernel: the preprocessing and token counts)
    tokens: ImageTokens
    # 26B/31B: sliding layers attend both ways inside an image run; the decoder takes `mm_block_ids`
    # (export.json "decoder_mask"; exports written before it refuse image prompts)
    bidirectional_image_blocks: bool
    max_images: int = 8  # per prompt: bounds the vision graph's image axis (engine profiles)
    audio: AudioTokens | None = None  # exports with an audio graph: its soft tokens are merged too

    def to_dict(self) -> dict[str, Any]:
        d = {
            "token_ids": {**self.tokens.to_dict(), **(self.audio.to_dict() if self.audio else {})},
            "vision": self.vision.to_dict(),
            "bidirectional_image_blocks": self.bidirectional_image_blocks,
            "max_images": self.max_images,
            "decoder_mask": self.decoder_mask(),
        }
        if self.audio is not None:  # the front end is fixed by the feature extractor; recorded for runtimes
            d["audio"] = {
                "sample_rate": fe.SAMPLE_RATE,
                "frame_length": fe.FRAME_LENGTH,
                "hop_length": fe.HOP_LENGTH,
                "fft_length": fe.FFT_LENGTH,
                "mel_bins": fe.MEL_BINS,
                "mel_floor": fe.MEL_FLOOR,
                "pad_to_multiple_of": fe.PAD_TO_MULTIPLE_OF,
                "max_samples": fe.MAX_SAMPLES,
                "subsampling": 4,
            }
        return d

    def decoder_mask(self) -> dict[str, Any]:
        """How the decoder's sliding layers treat image runs (docs/export-format.md, Multimodal)."""
        blocks = self.bidirectional_image_blocks
        return {
            "bidirectional_blocks": "vision" if blocks else None,
            "input": MM_BLOCK_IDS if blocks else None,
            "block_token_types": ["image"] if blocks else [],  # runs of the image placeholder; no video
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultimodalSpec:
        ids = d["token_ids"]
        audio = {k: ids[k] for k in ("boa", "audio", "eoa")} if "audio" in d else None
        return cls(
            VisionSpec(**d["vision"]),
            ImageTokens(**{k: v for k, v in ids.items() if k not in ("boa", "audio", "eoa")}),
            bool(d["bidirectional_image_blocks"]),
            int(d["max_images"]),
            AudioTokens(**audio) if audio else None,
        )


@dataclass(frozen=True)
class ExportManifest:
    """A finished export directory, as later stages see it."""

    path: Path
    dtype: str  # activations: a DType value ("fp32" | "fp16" | "bf16")
    opset: int
    max_seq_len: int
    spec: Gemma4Spec | None  # None only for lenient loads of exports this tool did not write
    graphs: dict[str, GraphSpec]  # by role, in pipeline order
    caches: list[CacheSpec]
    custom_nodes: list[dict[str, Any]]
    files: dict[str, str]
    tools: dict[str, str]
    debug: bool = False
    weights: bool = True
    lowering: str | None = None  # a name from passes/lowerings.py (an onnxruntime-only variant)
    checkpoint: str | None = None  # absolute path of the source checkpoint (provenance; reference runners)
    dims: dict[str, Any] = field(default_factory=dict)
    weight_format: str = ""  # how weights are stored (dtypes.WEIGHT_FORMATS); "" = as the activations
    # weight-only quantization (export.json "quantization"); None = float weights
    quant: QuantSpec | None = None
    multimodal: MultimodalSpec | None = None  # exports with a vision graph
    sha256: str = field(default="", compare=False)  # of export.json itself: one fingerprint for the export

    def __post_init__(self) -> None:
        if not self.weight_format:
            object.__setattr__(self, "weight_format", weight_format_for(self.dtype))

    @property
    def activation_dtype(self) -> DType:
        return DType.parse(self.dtype)

    @property
    def sliding_window(self) -> int | None:
        w = self.dims.get("sliding_cache_len")
        return w if isinstance(w, int) else None

    def graph_path(self, role: str) -> Path:
        return self.path / self.graphs[role].file

    def check_graph_file(self, role: str) -> None:
        """The graph file of `role` and its external data still match export.json (see `verify`)."""
        self.verify([role])

    # ----- integrity (docs/export-format.md, "Integrity") ---------------------------------------
    def verify(self, roles: Iterable[str] | None = None) -> None:
        """Refuse, with an ExportError naming the file, an export changed since it was written: export.json
        edited (its seal, its own consistency), or a graph file or external data file of `roles` (default: all)
        missing or not matching its sha256. Hashes come from the sidecar cache while the files are untouched."""
        check_seal(self.path)
        self.check_consistency()
        expected = self._expected_hashes(list(self.graphs) if roles is None else roles)
        actual = sha256_files(self.path, expected)
        for name, sha in expected.items():
            if actual[name] != sha:
                raise ExportError(
                    f"{self.path / name} does not match its sha256 in export.json (changed after export); "
                    "re-run the export"
                )

    def _expected_hashes(self, roles: Iterable[str]) -> dict[str, str]:
        """File name -> recorded sha256 of the graph files and external data of `roles`; every one must exist.
        Files without a recorded hash (hand-made lenient exports) are checked for presence only."""
        expected: dict[str, str] = {}
        for role in roles:
            g = self.graphs[role]
            for name in (g.file, *g.external_data):
                path = self.path / name
                if not path.is_file():
                    what = "graph" if name == g.file else f"external data of {g.file}"
                    raise ExportError(f"{path} is missing ({what}, listed in export.json graphs.{role})")
                recorded = {h for h in (self.files.get(name), g.sha256 if name == g.file else "") if h}
                if len(recorded) > 1:
                    raise ExportError(
                        f"{self.path / MANIFEST}: graphs.{role}.sha256 and files.{name} disagree; re-run the export"
                    )
                if recorded:
                    expected[name] = recorded.pop()
        return expected

    def check_consistency(self) -> None:
        """export.json agrees with itself: the dtype with the decoder's I/O, the sliding window of the spec with
        the caches and dims, the caches with the spec's layer plan. Catches a hand edit of one field, sealed or not."""
        where = self.path / MANIFEST
        try:
            act = self.activation_dtype.onnx_name
        except Gemma4CompileError:
            raise ExportError(f"{where}: dtype {self.dtype!r} is not an export dtype") from None
        decoder = self.graphs.get(DECODER)
        embeds = [t for t in decoder.inputs if t.name == "inputs_embeds"] if decoder else []
        if embeds and embeds[0].dtype != act:
            raise ExportError(
                f"{where}: dtype {self.dtype!r} but graphs.decoder input inputs_embeds is {embeds[0].dtype}"
            )
        if self.spec is None:
            return
        window = self.dims.get(SLIDING_SLOTS)
        if window is not None and window != self.spec.sliding_window:
            raise ExportError(
                f"{where}: dims.{SLIDING_SLOTS} is {window!r} but spec.sliding_window is {self.spec.sliding_window}"
            )
        if self.caches and [c.to_dict() for c in self.caches] != [
            cache_spec(self.spec, p).to_dict() for p in self.spec.cache_layers
        ]:
            raise ExportError(
                f"{where}: caches do not match the spec's layer plan (window, heads or head_dim)"
            )
        if not 1 <= self.max_seq_len <= max(self.spec.max_position_embeddings, 1):
            raise ExportError(
                f"{where}: max_seq_len {self.max_seq_len} is outside [1, {self.spec.max_position_embeddings}]"
            )

    def to_json(self) -> dict[str, Any]:
        d = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype,
            "weight_format": self.weight_format,
            "opset": self.opset,
            "max_seq_len": self.max_seq_len,
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "graphs": {role: g.to_dict() for role, g in self.graphs.items()},
            "caches": [c.to_dict() for c in self.caches],
            "custom_nodes": self.custom_nodes,
            "files": self.files,
            "tools": self.tools,
            "debug": self.debug,
            "weights": self.weights,
            "lowering": self.lowering,
            "checkpoint": self.checkpoint,
            "dims": self.dims,
            "quantization": self.quant.to_dict() if self.quant is not None else None,
        }
        if self.multimodal is not None:  # absent from text-only exports: their export.json is unchanged
            d["multimodal"] = self.multimodal.to_dict()
        return {**d, SEAL: seal_of(d)}

    def save(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, export_dir: str | Path, *, lenient: bool = False) -> ExportManifest:
        """Read OUT/export.json. Strict (the default) needs every field this tool writes; lenient needs only the
        graphs (each file present) and defaults the rest, for exports of graphs the exporter did not write."""
        path = Path(export_dir)
        file, d = read_manifest_json(path)
        get = _getter(d, lenient)
        try:
            graphs = {role: _graph_spec(path, role, g, lenient) for role, g in get("graphs", {}).items()}
            return cls(
                path=path,
                dtype=get("dtype", "fp32"),
                opset=int(get("opset", 0)),
                max_seq_len=int(get("max_seq_len", 0)),
                spec=_spec(d.get("spec"), lenient),
                graphs=graphs,
                caches=[CacheSpec.from_dict(c) for c in get("caches", [])],
                custom_nodes=list(get("custom_nodes", [])),
                files=dict(get("files", {})),
                tools=dict(get("tools", {})),
                debug=d.get("debug", False),
                weights=d.get("weights", True),
                checkpoint=d.get("checkpoint"),
                lowering=d.get("lowering"),
                dims=dict(d.get("dims", {})),
                weight_format=d.get("weight_format", ""),
                quant=QuantSpec.from_dict(d["quantization"]) if d.get("quantization") else None,
                multimodal=MultimodalSpec.from_dict(d["multimodal"]) if d.get("multimodal") else None,
                sha256=sha256_file(file),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{file}: malformed manifest ({type(e).__name__}: {e})") from None


def _getter(d: dict[str, Any], lenient: bool) -> Any:
    """d.get(key, default) when lenient, else d[key] (a missing field is a KeyError: malformed manifest)."""
    return d.get if lenient else (lambda key, default=None: d[key])


def _spec(d: dict[str, Any] | None, lenient: bool) -> Gemma4Spec | None:
    if not lenient:
        if d is None:
            raise KeyError("spec")
        return Gemma4Spec.from_dict(d)
    try:
        return Gemma4Spec.from_dict(d or {})
    except (KeyError, TypeError, ValueError, Gemma4CompileError):
        return None


def _graph_spec(root: Path, role: str, g: dict[str, Any], lenient: bool) -> GraphSpec:
    where = f"graphs.{role}"
    if lenient and not (root / g["file"]).is_file():
        raise ExportError(f"{root / g['file']} is missing (listed in export.json {where})")
    get = _getter(g, lenient)
    return GraphSpec(
        role,
        g["file"],
        get("sha256", ""),
        list(get("external_data", [])),
        tensor_specs(get("inputs", []), f"{where}.inputs"),
        tensor_specs(get("outputs", []), f"{where}.outputs"),
    )


def read_manifest_json(export_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(path, content) of OUT/export.json after the checks every reader needs: it exists, parses, and has this
    format and version."""
    file = export_dir / MANIFEST
    if not file.is_file():
        raise ExportError(
            f"{export_dir} is not an export directory (no {MANIFEST}); run 'gemma4-compile export' first"
        )
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        found = (
            f"{d.get('format')!r} version {d.get('version')!r}" if isinstance(d, dict) else type(d).__name__
        )
        raise ExportError(f"{file}: expected format {FORMAT!r} version {VERSION}, found {found}")
    return file, d


def seal_of(d: dict[str, Any]) -> str:
    """sha256 of export.json's content but UNSEALED fields, in canonical JSON (sorted keys, no spaces), so that
    reformatting the file keeps the seal and editing any other value breaks it."""
    body = {k: v for k, v in d.items() if k not in UNSEALED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_seal(export_dir: Path) -> None:
    """export.json still holds what the exporter wrote (exports without a seal, from before it or hand-made,
    pass: `check_consistency` still applies to them)."""
    file, d = read_manifest_json(export_dir)
    if SEAL in d and d[SEAL] != seal_of(d):
        raise ExportError(f"{file} was edited after export (its {SEAL} does not match); re-run the export")


def tensor_specs(entries: list[dict[str, Any]], where: str) -> list[TensorSpec]:
    """A graph's `inputs` or `outputs` list -> TensorSpecs; `where` names the list in errors."""
    try:
        return [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in entries]
    except (KeyError, TypeError) as e:
        raise ExportError(f"export.json {where}: each tensor needs name, dtype and shape ({e})") from None
