"""Fakes of the TensorRT runner's two seams, for its tests on a machine without a GPU: FakeCuda (libcudart calls
over numpy bytes) and FakeContext (a TensorRT execution context that runs the graph's .onnx with onnxruntime on
the fake device memory at the addresses bound). They check the runner's plumbing (bindings, shapes, copies,
swaps, profiles), not TensorRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gemma4_compile.dtypes import DType
from gemma4_compile.engines.profiles import ProfileLimits, ShapeProfile, derive_profiles
from gemma4_compile.export.manifest import AUDIO, DECODER, VISION, ExportManifest
from gemma4_compile.runners.base import BaseRunner
from gemma4_compile.runners.cuda import DeviceArray
from gemma4_compile.runners.trt import StepBuffers, TowerEngine, TrtRunner


class FakeCuda:
    """CudaRuntime's calls over host bytes: allocations are numpy byte arrays at made-up addresses (an address
    inside an allocation works, one outside raises); new memory is filled with 0xAB so a missing zeroing shows.
    Counts what the buffers ask for."""

    def __init__(self):
        self.heap: dict[int, np.ndarray] = {}
        self.next_ptr = 0x1000
        self.mallocs = self.frees = self.copies = self.syncs = 0

    def malloc(self, nbytes: int) -> int:
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + nbytes + 0x100
        self.heap[ptr] = np.full(nbytes, 0xAB, np.uint8)
        self.mallocs += 1
        return ptr

    def free(self, ptr: int) -> None:
        del self.heap[ptr]  # a KeyError on a double free
        self.frees += 1

    def at(self, ptr: int, nbytes: int) -> np.ndarray:
        """The `nbytes` bytes at device address `ptr` (a view)."""
        base = max((b for b in self.heap if b <= ptr), default=None)
        assert base is not None and ptr + nbytes <= base + self.heap[base].size, (
            f"{ptr:#x}+{nbytes} is not allocated"
        )
        return self.heap[base][ptr - base : ptr - base + nbytes]

    def memset(self, ptr: int, nbytes: int, stream: int) -> None:
        self.at(ptr, nbytes)[:] = 0

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        self.at(ptr, host.nbytes)[:] = host.reshape(-1).view(np.uint8)
        self.copies += 1

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        host.reshape(-1).view(np.uint8)[:] = self.at(ptr, host.nbytes)
        self.copies += 1

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.at(dst, nbytes)[:] = self.at(src, nbytes)
        self.copies += 1

    def synchronize(self, stream: int) -> None:
        self.syncs += 1

    def read(self, buffer: DeviceArray) -> np.ndarray:
        return self.at(buffer.ptr, buffer.nbytes).view(buffer.dtype).reshape(buffer.shape)

    def write(self, buffer: DeviceArray, values: np.ndarray) -> None:
        self.at(buffer.ptr, buffer.nbytes)[:] = (
            np.ascontiguousarray(values, buffer.dtype).reshape(-1).view(np.uint8)
        )


# onnxruntime's type names -> numpy (ONNX "float" is float32; numpy's "float" would be float64)
_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(bool)": np.dtype(bool),
}


class FakeContext:
    """The TensorRT execution-context calls TrtRunner makes, running decoder.onnx with onnxruntime on the fake
    device memory at the addresses bound: checks the runner's plumbing (bindings, shapes, swaps), not TensorRT."""

    def __init__(self, cuda: FakeCuda, session, index: int, profile: ShapeProfile | None = None):
        """`profile`: refuse input shapes outside it, as TensorRT's set_input_shape does."""
        self.cuda, self.session, self.active_optimization_profile = cuda, session, index
        self.profile = profile
        self.types = {i.name: _ORT_TYPES[i.type] for i in session.get_inputs()}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.results: dict[str, np.ndarray] | None = None

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.profile is not None:
            s = self.profile.shape(name)
            if not all(lo <= d <= hi for lo, d, hi in zip(s.min, shape, s.max)):
                return False
        self.shapes[name], self.results = tuple(shape), None
        return True

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def _outputs(self) -> dict[str, np.ndarray]:
        if self.results is None:
            feeds = {}
            for name, shape in self.shapes.items():
                nbytes = int(np.prod(shape)) * self.types[name].itemsize
                raw = self.cuda.at(self.addresses[name], nbytes) if nbytes else np.empty(0, np.uint8)
                feeds[name] = raw.copy().view(self.types[name]).reshape(shape)
            names = [o.name for o in self.session.get_outputs()]
            self.results = dict(zip(names, self.session.run(None, feeds)))
        return self.results

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._outputs()[name].shape

    def execute_async_v3(self, stream: int) -> bool:
        inputs = {self.addresses[n] for n in self.shapes}
        for name, value in self._outputs().items():
            assert self.addresses[name] not in inputs, f"{name} aliases an input"
            self.cuda.at(self.addresses[name], value.nbytes)[:] = value.reshape(-1).view(np.uint8)
        return True


SMALL = ProfileLimits(max_batch=2, max_seq=32)  # the engines the text tests run


class FakeLogger:
    def errors(self) -> list[str]:
        return []


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _fake_tower(export: ExportManifest, role: str, cuda: FakeCuda, limits: ProfileLimits) -> TowerEngine:
    """What TrtRunner._tower builds from a deserialized engine, over FakeCuda and a FakeContext."""
    (profile,) = derive_profiles(export, limits, role)
    spec = export.graphs[role]
    context = FakeContext(cuda, _session(export.graph_path(role)), 0, profile)
    buffers = StepBuffers(cuda, {t.name: DType.parse(t.dtype).numpy for t in spec.inputs + spec.outputs})
    return TowerEngine(spec, context, profile, buffers, 0, FakeLogger())


def runner_on_fakes(
    out: Path,
    cuda: FakeCuda,
    limits: ProfileLimits = SMALL,
    towers: tuple[str, ...] = (VISION, AUDIO),
) -> TrtRunner:
    """A TrtRunner wired as __init__ wires it (the engines built with `limits`; tower engines for the roles
    of `towers` the export has), with FakeCuda for libcudart and FakeContexts for TensorRT."""
    runner = TrtRunner.__new__(TrtRunner)
    BaseRunner.__init__(runner)
    export = ExportManifest.load(out, lenient=True)
    runner.cuda, runner.stream, runner.logger, runner.engine_target = cuda, 0, FakeLogger(), "fake"
    runner.profiles = derive_profiles(export, limits)
    runner._use_export(export)
    session = _session(export.graph_path(DECODER))
    runner.contexts = [FakeContext(cuda, session, i, p) for i, p in enumerate(runner.profiles)]
    graph = export.graphs[DECODER]
    runner.buffers = StepBuffers(
        cuda, {t.name: DType.parse(t.dtype).numpy for t in graph.inputs + graph.outputs}
    )
    roles = [r for r in towers if r in export.graphs]
    runner.towers = {r: _fake_tower(export, r, cuda, limits) for r in roles}
    return runner
