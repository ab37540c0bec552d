"""TensorRT engine runner: the embed graph on the CPU (a gather), the decoder engine on the GPU.

    runner = TrtRunner("OUT", "sm89")       # OUT/engines/sm89, checked against this GPU and TensorRT
    runner.generate(ids, steps=8)

Caches live on the GPU as torch tensors, shaped as export.json says: sliding caches W slots, global caches
`max_len` slots. Presents are written to a second set of buffers and swapped in after each step (TensorRT
inputs and outputs must not alias). Nothing here touches a TensorRT runtime unless a CUDA GPU is present:
a runtime created without one can segfault (docs/tensorrt.md, runtimes without a GPU).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DType
from ..engines.load import deserialize, engine_dir, open_engine
from ..engines.manifest import read_manifest
from ..engines.profiles import profile_index
from ..engines.seam import load_trt, make_logger
from ..errors import BackendUnavailable, Gemma4CompileError, RunnerError
from ..export.manifest import AUDIO_EMBEDS, DECODER, EMBED, IMAGE_EMBEDS, MM_BLOCK_IDS, ExportManifest
from ..targets import local_device_sm
from .base import BaseRunner, DecodeState, empty_rows


def _torch_dtype(name: str | int) -> Any:
    """Export dtype ('bf16'), TensorRT DataType name ('BF16') or ONNX element type (16) -> torch dtype."""
    return DType.parse(name).torch


class EmbedGraph:
    """embed.onnx on the CPU: onnxruntime, or onnx's reference evaluator where onnxruntime has no kernel
    (its CPU provider has no bf16 Mul). Outputs are CPU torch tensors, bf16 included (numpy cannot hold it)."""

    def __init__(self, path: Path, soft_inputs: Any = ()):
        """`soft_inputs`: the graph's soft-token inputs (TensorSpecs) when it merges images / audio; fed zero
        rows."""
        import onnxruntime as ort

        self.no_rows = {t.name: empty_rows(t) for t in soft_inputs}
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.reference = None
        except (
            Exception
        ):  # onnxruntime raises NotImplemented/Fail subclasses of RuntimeError for missing kernels
            from onnx.reference import ReferenceEvaluator

            self.session, self.reference = None, ReferenceEvaluator(str(path))
        self.backend = "onnxruntime" if self.session is not None else "onnx.reference"

    def run(self, input_ids: np.ndarray) -> dict[str, Any]:
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64), **self.no_rows}
        if self.reference is not None:
            names = self.reference.output_names
            return {n: _numpy_to_torch(a) for n, a in zip(names, self.reference.run(None, feeds))}
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        names = [o.name for o in self.session.get_outputs()]
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return {name: _ortvalue_to_torch(value) for name, value in zip(names, binding.get_outputs())}


def _numpy_to_torch(array: np.ndarray) -> Any:
    import torch

    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _ortvalue_to_torch(value: Any) -> Any:
    """Copy a CPU OrtValue of any dtype into a torch tensor (OrtValue.numpy() cannot return bf16)."""
    import torch

    shape, dtype = value.shape(), _torch_dtype(value.element_type())
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = bytearray((ctypes.c_uint8 * nbytes).from_address(value.data_ptr()))  # a copy: ORT owns the buffer
    return torch.frombuffer(raw, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


class TrtRunner(BaseRunner):
    """Runs OUT/engines/<target>/decoder.engine; raises BackendUnavailable (with the reason) where it cannot."""

    name = "trt"

    def __init__(self, export_dir: str | Path, target: str = "native"):
        super().__init__()
        device_sm = local_device_sm()
        if device_sm is None:
            raise BackendUnavailable("trt: needs a CUDA GPU (the CUDA driver reports none on this machine)")
        import torch

        self.export = ExportManifest.load(export_dir, lenient=True)
        self.export.verify()  # the embed graph runs from the export; its files must be what was exported
        directory = engine_dir(export_dir, target)
        manifest = read_manifest(directory)
        try:
            flavour = load_trt(manifest.flavour)
        except Gemma4CompileError as e:
            raise BackendUnavailable(f"trt: the engine needs {manifest.trt_title}: {e}") from None
        # refuses another export (naming a graph whose ONNX changed), TensorRT or GPU; -> the decoder engine.
        # The embed graph runs on the CPU from embed.onnx (below) even when the build made embed.engine.
        self.engine_file = open_engine(directory, flavour, device_sm, export=self.export)
        self.manifest = self.engine_file.manifest
        self.engine_target = self.manifest.target
        self.logger = make_logger(flavour, "WARNING")
        self.runtime, self.engine = deserialize(self.engine_file, flavour, device_sm, self.logger)
        self.profiles = self.manifest.profiles
        self.stream = torch.cuda.Stream()
        self.contexts = [self._context(i) for i in range(len(self.profiles))]
        embed_inputs = {t.name: t for t in self.export.graphs[EMBED].inputs}
        soft = [embed_inputs[n] for n in (IMAGE_EMBEDS, AUDIO_EMBEDS) if n in embed_inputs]
        self.embed = EmbedGraph(self.export.graph_path(EMBED), soft)
        mm = self.export.multimodal
        if IMAGE_EMBEDS in embed_inputs and mm is not None:  # placeholders: none accepted
            self.image_token_id = mm.tokens.image
            self.image_refusal = "trt: image prompts run on the ort backend for now"
        if AUDIO_EMBEDS in embed_inputs and mm is not None and mm.audio is not None:
            self.audio_token_id = mm.audio.audio
            self.audio_refusal = "trt: audio prompts run on the ort backend for now"
        self.spec = self.export.spec
        self.max_seq_len = self.export.max_seq_len or self._global_slots_max()
        self.dtype = _torch_dtype(self.export.dtype)
        self.inputs = [t.name for t in self.export.graphs[DECODER].inputs]
        self.outputs = [t.name for t in self.export.graphs[DECODER].outputs]

    def _context(self, index: int):
        context = self.engine.create_execution_context()
        context.set_optimization_profile_async(index, self.stream.cuda_stream)
        return context

    # ----- limits -------------------------------------------------------------------------------
    def _max(self, input_name: str, axis: int) -> int:
        return max(p.shape(input_name).max[axis] for p in self.profiles)

    def _global_slots_max(self) -> int:
        globals_ = [c.past[0] for c in self.export.caches if c.kind == "global"]
        return min((self._max(n, 2) for n in globals_), default=1 << 62)

    # ----- BaseRunner ---------------------------------------------------------------------------
    def _new_caches(self, batch: int, max_len: int) -> dict[str, Any]:
        import torch

        if batch > self._max("past_len", 0):
            raise RunnerError(
                f"{self.name}: batch {batch} exceeds the engine's max_batch {self._max('past_len', 0)}"
            )
        if max_len > self._global_slots_max():
            raise RunnerError(
                f"{self.name}: max_len {max_len} exceeds the engine's cache_len {self._global_slots_max()}"
            )
        return {
            past: torch.zeros(c.shape(batch, max_len), dtype=self.dtype, device="cuda")
            for c in self.export.caches
            for past in c.past
        }

    def _step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        import torch

        S = input_ids.shape[1]
        if "spare" not in state.extra:  # presents are written here, then swapped in (no aliasing I/O)
            pairs = [(p, q) for c in self.export.caches for p, q in zip(c.past, c.present)]
            state.extra["spare"] = {q: torch.empty_like(state.caches[p]) for p, q in pairs}
        self._soft_rows(state, input_ids)  # a placeholder without its soft token is refused
        feeds = self._embed(input_ids)
        feeds["past_len"] = torch.from_numpy(state.past_len).cuda()
        feeds["seq_len"] = torch.from_numpy(np.asarray(seq_len, dtype=np.int64)).cuda()
        if MM_BLOCK_IDS in self.inputs:  # 26B/31B exports with images; -1 while image prompts are refused
            feeds[MM_BLOCK_IDS] = torch.from_numpy(self._block_ids(input_ids, seq_len)).cuda()
        feeds.update(state.caches)
        context = self.contexts[profile_index(self.profiles, S)]
        outputs = self._run(context, feeds, state.extra["spare"])
        self._swap(state, outputs)
        return outputs["logits"].float().cpu().numpy()

    # ----- internals ----------------------------------------------------------------------------
    def _embed(self, input_ids: np.ndarray) -> dict[str, Any]:
        return {k: v.cuda() for k, v in self.embed.run(input_ids).items() if k in self.inputs}

    def _run(self, context, feeds: dict[str, Any], spare: dict[str, Any]) -> dict[str, Any]:
        import torch

        for name in self.inputs:
            if name not in feeds:
                raise RunnerError(f"{self.name}: no value for decoder input {name!r}")
            tensor = feeds[name].contiguous()
            feeds[name] = tensor
            if not context.set_input_shape(name, tuple(tensor.shape)):
                profile = self.profiles[context.active_optimization_profile].shape(name)
                raise RunnerError(
                    f"{self.name}: input {name!r} shape {tuple(tensor.shape)} is outside the engine's profile "
                    f"{profile.min}..{profile.max}"
                )
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            buffer = spare.get(name)
            if buffer is None or tuple(buffer.shape) != shape:
                dtype = _torch_dtype(self.engine.get_tensor_dtype(name).name)
                buffer = torch.empty(shape, dtype=dtype, device="cuda")
            outputs[name] = buffer
            context.set_tensor_address(name, buffer.data_ptr())
        torch.cuda.current_stream().synchronize()  # inputs were copied on the default stream
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RunnerError(f"{self.name}: TensorRT execution failed: {'; '.join(self.logger.errors())}")
        self.stream.synchronize()
        return outputs

    def _swap(self, state: DecodeState, outputs: dict[str, Any]) -> None:
        """present -> next step's past; the old past buffer becomes the next present buffer."""
        for c in self.export.caches:
            for past, present in zip(c.past, c.present):
                state.extra["spare"][present] = state.caches[past]
                state.caches[past] = outputs[present]
