"""The decoder's reference inputs and outputs as Polygraphy files, so a plain `polygraphy run` can redo the check.

    polygraphy run OUT/decoder.onnx --onnxrt \
        --load-inputs OUT/reports/polygraphy_inputs.json --load-outputs OUT/reports/polygraphy_ref.json \
        --atol A --rtol R

Inputs are a list of feed dicts (Polygraphy's `save_json`), outputs a `RunResults` with one `IterationResult`
per feed, named exactly as the decoder's ONNX outputs (Polygraphy matches outputs by name). Two iterations:
a prefill of the longest case (the sliding rings wrap inside it) and one decode step on the caches it left.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable
from ..export.io_spec import cache_names
from ..export.manifest import DECODER, MANIFEST, MM_BLOCK_IDS, ExportManifest
from ..fsutil import atomic_file
from ..model.config import Gemma4Spec
from .cases import Case

REF_RUNNER_NAME = "torch_reference"
INPUTS_FILE, OUTPUTS_FILE = "polygraphy_inputs.json", "polygraphy_ref.json"
# Elementwise bounds for logits and K/V caches (Polygraphy passes an element within atol or rtol): fp32 as
# the validator's max |Δlogit|; half precision at ~2 ulps of a K/V entry (normed, |x| <= ~4) and of the
# logits (|x| <= 30), NVIDIA/TensorRT#3893 suggests ~1e-3 for fp16 as the floor.
POLYGRAPHY_TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (6e-2, 1e-2), "bf16": (2.5e-1, 3e-2)}


@dataclass(frozen=True)
class PolygraphyFiles:
    inputs: str
    outputs: str
    iterations: int
    atol: float
    rtol: float
    command: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _polygraphy():
    try:
        from polygraphy.comparator import IterationResult, RunResults
        from polygraphy.json import save_json
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise BackendUnavailable("polygraphy is not installed (pip install 'gemma4-compile[test]')") from None
    return save_json, RunResults, IterationResult, G_LOGGER


def _array(t: Any) -> Any:
    """numpy for what numpy holds; bf16 stays a torch tensor (Polygraphy serializes those with torch.save)."""
    import torch

    t = t.detach()
    return t.contiguous() if t.dtype == torch.bfloat16 else t.numpy().copy()


def decoder_reference_io(
    model: Any, case: Case, debug: bool = False, block_ids: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Feeds and named outputs of the decoder graph for a prefill of `case` and one greedy decode step.
    `block_ids`: the decoder takes `mm_block_ids` (26B/31B exports with images); text cases feed -1."""
    import torch

    spec: Gemma4Spec = model.spec
    names = [cache_names(p) for p in spec.cache_layers]  # ((past k, past v), (present k, present v))
    from ..model.model import debug_output_names

    B, S = case.input_ids.shape
    dtype = model.embed_tokens.weight.dtype
    caches = model.new_cache(B, S + 1, dtype)
    past_len = torch.zeros(B, dtype=torch.int64)
    seq_len = torch.from_numpy(case.lengths.astype(np.int64))
    ids = torch.from_numpy(case.input_ids)
    feeds, outputs = [], []
    with torch.inference_mode():
        for _ in range(2):
            embeds, tok = model.embed(ids)
            feed = {"inputs_embeds": embeds, **({"per_layer_tokens": tok} if tok is not None else {})}
            feed |= {"past_len": past_len, "seq_len": seq_len}
            if block_ids:
                feed[MM_BLOCK_IDS] = torch.full(ids.shape, -1, dtype=torch.int64)
            for (past, _), (k, v) in zip(names, caches):
                feed |= {past[0]: k, past[1]: v}
            logits, caches, extra = model(embeds, tok, past_len, seq_len, caches, debug)
            out = {"logits": logits}
            for (_, present), (k, v) in zip(names, caches):
                out |= {present[0]: k, present[1]: v}
            if debug:
                out |= dict(zip(debug_output_names(spec), extra))
            feeds.append({k: _array(v) for k, v in feed.items()})
            outputs.append({k: _array(v) for k, v in out.items()})
            last = logits[torch.arange(B), seq_len - 1].argmax(-1)  # the next greedy token of every row
            ids, past_len, seq_len = last[:, None], past_len + seq_len, torch.ones(B, dtype=torch.int64)
    return feeds, outputs


def polygraphy_command(onnx_path: Path, inputs: Path, outputs: Path, atol: float, rtol: float) -> str:
    return (
        f"polygraphy run {onnx_path} --onnxrt --load-inputs {inputs} --load-outputs {outputs} "
        f"--atol {atol:g} --rtol {rtol:g}"
    )


def save_decoder_reference(
    reference: Any, export_dir: str | Path, out_dir: str | Path, case: Case, precision: str
) -> PolygraphyFiles:
    """Write polygraphy_inputs.json / polygraphy_ref.json for `case` into `out_dir` (atomically)."""
    save_json, RunResults, IterationResult, G_LOGGER = _polygraphy()
    model = getattr(reference, "model", None)
    if model is None or not hasattr(model, "embed"):
        raise BackendUnavailable(
            f"{getattr(reference, 'name', 'reference')}: not our torch model; use reference='torch'"
        )
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = ExportManifest.load(export_dir) if (export_dir / MANIFEST).is_file() else None
    debug = manifest is not None and manifest.debug
    blocks = manifest is not None and MM_BLOCK_IDS in {t.name for t in manifest.graphs[DECODER].inputs}
    feeds, outs = decoder_reference_io(model, case, debug, blocks)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs_path, outputs_path = out_dir / INPUTS_FILE, out_dir / OUTPUTS_FILE
    results = RunResults()
    results.append((REF_RUNNER_NAME, [IterationResult(o, runner_name=REF_RUNNER_NAME) for o in outs]))
    with G_LOGGER.verbosity(G_LOGGER.WARNING):  # its "Saving ... to <temp file>" lines would only confuse
        with atomic_file(inputs_path) as tmp:
            save_json(feeds, str(tmp), description="gemma4 decoder reference inputs")
        with atomic_file(outputs_path) as tmp:
            results.save(str(tmp))
    atol, rtol = POLYGRAPHY_TOLERANCES.get(precision, POLYGRAPHY_TOLERANCES["fp32"])
    note = "onnxruntime's CPU provider has no bf16 MatMul: run this with --trt" if precision == "bf16" else ""
    decoder = manifest.graph_path(DECODER) if manifest else export_dir / f"{DECODER}.onnx"
    command = polygraphy_command(decoder, inputs_path, outputs_path, atol, rtol)
    return PolygraphyFiles(str(inputs_path), str(outputs_path), len(feeds), atol, rtol, command, note)
