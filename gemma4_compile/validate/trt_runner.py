"""TensorRT engine runner: the embed graph on onnxruntime (CPU, a gather), the decoder engine on the GPU.

    runner = TrtRunner("OUT", "sm89")       # OUT/engines/sm89, checked against this GPU and TensorRT
    runner.generate(ids, steps=8)

Caches live on the GPU as torch tensors, shaped as export.json says: sliding caches W slots, global caches
`max_len` slots. Presents are written to a second set of buffers and swapped in after each step (TensorRT
inputs and outputs must not alias). Nothing here touches a TensorRT runtime unless a CUDA GPU is present:
a runtime created without one can segfault (tensorrt-notes.md §1.2).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from ..engines.export_info import ExportInfo, read_export
from ..engines.load import deserialize, engine_dir, open_engine
from ..engines.manifest import read_manifest
from ..engines.profiles import profile_index
from ..engines.targets import local_device_sm
from ..engines.trt import load_trt
from ..engines.trt_logger import make_logger
from ..errors import BackendUnavailable, Gemma4CompileError
from ..model.config import Gemma4Spec
from .runners import BaseRunner, DecodeState

_ORT_BYTES = {1: 4, 10: 2, 16: 2, 7: 8}  # onnx elem type -> bytes: float, float16, bfloat16, int64


def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "float32": torch.float32,
            "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}  # fmt: skip


def _spec(export: ExportInfo) -> Gemma4Spec | None:
    """The model spec export.json carries (None when it is not a full Gemma4Spec, e.g. a synthetic export)."""
    raw = dict(export.raw.get("spec", {}))
    try:
        for key in ("layer_types", "eos_token_id"):
            raw[key] = tuple(raw[key])
        raw["layer_overrides"] = tuple(tuple(o) for o in raw.get("layer_overrides", ()))
        return Gemma4Spec(**raw)
    except (KeyError, TypeError, Gemma4CompileError):
        return None


class TrtRunner(BaseRunner):
    """Runs OUT/engines/<target>/decoder.engine; raises BackendUnavailable (with the reason) where it cannot."""

    name = "trt"

    def __init__(self, export_dir: str | Path, target: str = "native"):
        super().__init__()
        device_sm = local_device_sm()
        if device_sm is None:
            raise BackendUnavailable("trt: needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
        import onnxruntime as ort
        import torch

        self.export = read_export(export_dir)
        directory = engine_dir(export_dir, target)
        manifest = read_manifest(directory)
        try:
            flavour = load_trt(manifest.flavour)
        except Gemma4CompileError as e:
            raise BackendUnavailable(f"trt: the engine needs {manifest.trt_title}: {e}") from None
        self.engine_file = open_engine(directory, flavour, device_sm)  # refuses another TensorRT or GPU
        self.manifest = self.engine_file.manifest
        self.logger = make_logger(flavour, "WARNING")
        self.runtime, self.engine = deserialize(self.engine_file, flavour, device_sm, self.logger)
        self.profiles = self.manifest.profiles
        self.stream = torch.cuda.Stream()
        self.contexts = [self._context(i) for i in range(len(self.profiles))]
        self.embed = ort.InferenceSession(str(self.export.embed.file), providers=["CPUExecutionProvider"])
        self.spec = _spec(self.export)
        self.dtype = _torch_dtypes()[self.export.dtype]
        self.inputs = [t.name for t in self.export.decoder.inputs]
        self.outputs = [t.name for t in self.export.decoder.outputs]

    def _context(self, index: int):
        context = self.engine.create_execution_context()
        context.set_optimization_profile_async(index, self.stream.cuda_stream)
        return context

    # ----- limits -------------------------------------------------------------------------------
    def _max(self, input_name: str, axis: int) -> int:
        return max(p.shape(input_name).max[axis] for p in self.profiles)

    def _global_slots_max(self) -> int:
        globals_ = [c["past"][0] for c in self.export.caches if c["slots"] == "cache_len"]
        return min((self._max(n, 2) for n in globals_), default=1 << 62)

    # ----- BaseRunner ---------------------------------------------------------------------------
    def start(self, batch: int, max_len: int) -> DecodeState:
        import torch

        if batch > self._max("past_len", 0):
            raise Gemma4CompileError(f"{self.name}: batch {batch} exceeds the engine's max_batch {self._max('past_len', 0)}")
        if max_len > self._global_slots_max():
            raise Gemma4CompileError(f"{self.name}: max_len {max_len} exceeds the engine's cache_len {self._global_slots_max()}")
        window = self.export.sliding_window
        caches, spare = {}, {}
        for c in self.export.caches:
            slots = window if c["slots"] == "sliding_cache_len" else max_len
            shape = (batch, c["num_kv_heads"], slots, c["head_dim"])
            for past, present in zip(c["past"], c["present"]):
                caches[past] = torch.zeros(shape, dtype=self.dtype, device="cuda")
                spare[present] = torch.empty_like(caches[past])
        return DecodeState(np.zeros(batch, np.int64), max_len, caches, {"spare": spare})

    def step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        import torch

        S = input_ids.shape[1]
        if int((state.past_len + S).max()) > state.max_len:
            raise Gemma4CompileError(f"{self.name}: sequence exceeds the cache length {state.max_len}")
        feeds = self._embed(np.ascontiguousarray(input_ids, dtype=np.int64))
        feeds["past_len"] = torch.from_numpy(state.past_len).cuda()
        feeds["seq_len"] = torch.from_numpy(np.asarray(seq_len, dtype=np.int64)).cuda()
        feeds.update(state.caches)
        context = self.contexts[profile_index(self.profiles, S)]
        outputs = self._run(context, feeds, state.extra["spare"])
        self._swap(state, outputs)
        state.past_len = state.past_len + np.asarray(seq_len, dtype=np.int64)
        return outputs["logits"].float().cpu().numpy()

    # ----- internals ----------------------------------------------------------------------------
    def _embed(self, input_ids: np.ndarray) -> dict[str, Any]:
        """Run embed.onnx on the CPU, hand its outputs to the GPU (bf16 too, which numpy cannot hold)."""
        import torch

        binding = self.embed.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        names = [o.name for o in self.embed.get_outputs()]
        for name in names:
            binding.bind_output(name, "cpu")
        self.embed.run_with_iobinding(binding)
        out = {}
        for name, value in zip(names, binding.get_outputs()):
            if name not in self.inputs:
                continue
            shape, nbytes = value.shape(), _ORT_BYTES[value.element_type()]
            raw = bytearray((ctypes.c_uint8 * (int(np.prod(shape)) * nbytes)).from_address(value.data_ptr()))
            out[name] = torch.frombuffer(raw, dtype=self.dtype).reshape(shape).cuda()
        return out

    def _run(self, context, feeds: dict[str, Any], spare: dict[str, Any]) -> dict[str, Any]:
        import torch

        for name in self.inputs:
            tensor = feeds[name].contiguous()
            feeds[name] = tensor
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            buffer = spare.get(name)
            if buffer is None or tuple(buffer.shape) != shape:
                dtype = torch.float32 if name == "logits" else self.dtype
                buffer = torch.empty(shape, dtype=dtype, device="cuda")
            outputs[name] = buffer
            context.set_tensor_address(name, buffer.data_ptr())
        torch.cuda.current_stream().synchronize()  # inputs were copied on the default stream
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise Gemma4CompileError(f"{self.name}: TensorRT execution failed: {'; '.join(self.logger.errors())}")
        self.stream.synchronize()
        return outputs

    def _swap(self, state: DecodeState, outputs: dict[str, Any]) -> None:
        """present -> next step's past; the old past buffer becomes the next present buffer."""
        for c in self.export.caches:
            for past, present in zip(c["past"], c["present"]):
                state.extra["spare"][present] = state.caches[past]
                state.caches[past] = outputs[present]
