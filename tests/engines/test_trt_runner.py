"""TrtRunner: refuses cleanly without a GPU; its embed stage and device-buffer logic (against a numpy fake of the
CUDA seam) on the CPU; on a GPU with TensorRT, agrees with onnxruntime on the same export."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from engines_support import DEVICE_SM, has_exporter, needs_gpu_trt
from trt_fakes import FakeCuda, runner_on_fakes

from gemma4_compile.dtypes import DType
from gemma4_compile.errors import BackendUnavailable, BuildError, RunnerError
from gemma4_compile.runners.cuda import DeviceArray, cuda_runtime
from gemma4_compile.runners.trt import CacheBuffers, EmbedGraph, StepBuffers, TrtRunner


@pytest.mark.skipif(DEVICE_SM is not None, reason="this machine has a CUDA GPU")
def test_without_a_gpu_construction_says_why(synthetic_exports):
    with pytest.raises(BackendUnavailable, match=r"^trt: needs a CUDA GPU \(the CUDA driver reports none"):
        TrtRunner(synthetic_exports["fp16"], "sm89")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_embed_stage_on_the_synthetic_export(synthetic_exports, dtype):
    """The CPU half of TrtRunner: embed.onnx -> numpy arrays of the export dtype (bf16 as ml_dtypes')."""
    import onnx
    from onnx import numpy_helper

    out = synthetic_exports[dtype]
    embed = EmbedGraph(out / "embed.onnx")
    ids = np.array([[0, 5, 63], [7, 7, 1]])
    got = embed.run(ids)
    assert set(got) == {"inputs_embeds", "per_layer_tokens"}
    want_dtype = {"fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}[dtype]
    assert got["inputs_embeds"].dtype == want_dtype and got["per_layer_tokens"].shape == (2, 3, 3, 4)
    model = onnx.load(str(out / "embed.onnx"))
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "embed_tokens"))
    np.testing.assert_array_equal(
        got["inputs_embeds"].view(np.uint16), table[ids].view(np.uint16)
    )  # a gather


@pytest.mark.skipif(not has_exporter(), reason="gemma4_compile.export is not available")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_embed_stage_equals_its_backend_on_a_tiny_export(make_export, dtype):
    """EmbedGraph's numpy outputs are bit for bit what onnxruntime (fp32) or onnx's reference evaluator (bf16:
    onnxruntime's CPU provider has no bf16 Mul) computes from the same embed.onnx."""
    path = make_export("tiny-e2b", dtype) / "embed.onnx"
    embed = EmbedGraph(path)
    ids = np.array([[2, 17, 400, 9], [5, 0, 1, 260]])
    got = embed.run(ids)
    if dtype == "fp32":
        import onnxruntime as ort

        assert embed.backend == "onnxruntime"
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input_ids": ids})))
        bits = np.uint32
    else:
        from onnx.reference import ReferenceEvaluator

        assert embed.backend == "onnx.reference"
        reference = ReferenceEvaluator(str(path))
        want = dict(zip(reference.output_names, reference.run(None, {"input_ids": ids})))
        bits = np.uint16
    assert set(got) == set(want) == {"inputs_embeds", "per_layer_tokens"}
    for name, array in got.items():
        assert isinstance(array, np.ndarray) and array.dtype == DType.parse(dtype).numpy, name
        assert array.shape == want[name].shape and array.shape[:2] == ids.shape
        np.testing.assert_array_equal(
            array.view(bits), np.ascontiguousarray(want[name]).view(bits), err_msg=name
        )


@pytest.mark.skipif(not has_exporter(), reason="gemma4_compile.export is not available")
def test_embed_stage_matches_the_model_for_a_bf16_export(make_export, make_checkpoint):
    """onnxruntime's CPU provider has no bf16 Mul, so bf16 embeds run on onnx's reference evaluator."""
    import torch

    from gemma4_compile.validate.reference import TorchRunner

    out = make_export("tiny-e2b", "bf16")  # the export of the test above
    embed = EmbedGraph(out / "embed.onnx")
    assert embed.backend == "onnx.reference"
    ids = np.array([[2, 17, 400, 9]])
    got = embed.run(ids)
    model = TorchRunner(make_checkpoint("tiny-e2b"), "bf16").model
    with torch.inference_mode():
        embeds, per_layer = model.embed(torch.from_numpy(ids))
    assert got["inputs_embeds"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        got["inputs_embeds"].view(np.uint16), embeds.view(torch.int16).numpy().view(np.uint16)
    )
    per_layer = per_layer.reshape(got["per_layer_tokens"].shape).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got["per_layer_tokens"].view(np.uint16), per_layer)


# ----- device buffers, against a numpy-backed fake of the CUDA seam (the GPU path itself needs a GPU) --------
def test_device_array_grows_but_never_shrinks_and_frees_what_it_replaced():
    cuda = FakeCuda()
    buffer = DeviceArray(cuda, (2, 8), np.float16)
    first = buffer.ptr
    buffer.reshape((2, 4))  # smaller: same memory
    buffer.reshape((2, 8))  # back to the allocated size: same memory
    assert (buffer.ptr, buffer.allocations, cuda.mallocs, buffer.shape) == (first, 1, 1, (2, 8))
    buffer.reshape((3, 8))  # larger: a new allocation, the old one freed
    assert buffer.ptr != first and buffer.allocations == 2 and list(cuda.heap) == [buffer.ptr]
    del buffer
    gc.collect()
    assert cuda.heap == {} and cuda.frees == 2  # freed once each, by the finalizer at the end


def test_device_array_round_trips_bf16_bits_and_refuses_a_dtype_mismatch():
    cuda = FakeCuda()
    host = (np.arange(12, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16).reshape(3, 4)
    buffer = DeviceArray(cuda, (1, 1), ml_dtypes.bfloat16)
    buffer.upload(host, stream=0)
    assert buffer.shape == (3, 4)
    back = np.empty((3, 4), ml_dtypes.bfloat16)
    buffer.download(back, stream=0)
    np.testing.assert_array_equal(back.view(np.uint16), host.view(np.uint16))
    with pytest.raises(RunnerError, match=r"float16 array cannot be copied into a bfloat16 device buffer"):
        buffer.upload(host.astype(np.float16), stream=0)
    with pytest.raises(RunnerError, match=r"cannot copy a bfloat16\[3, 4\] device buffer"):
        buffer.download(np.empty((4, 3), ml_dtypes.bfloat16), stream=0)


def test_caches_start_zeroed_and_presents_swap_in_without_copies_or_allocations():
    """A fake engine writes present = past + 1 into the buffers the runner would bind; after N steps every past
    holds N, with no allocation or copy after start()."""
    cuda = FakeCuda()
    shapes = {"past.0.key": (2, 1, 4, 3), "past.1.key": (2, 1, 16, 3)}
    pairs = {"past.0.key": "present.0.key", "past.1.key": "present.1.key"}
    caches = CacheBuffers(cuda, shapes, pairs, ml_dtypes.bfloat16, stream=0)
    caches.zero()
    assert all((cuda.read(b).view(np.uint16) == 0).all() for b in caches.past.values())
    mallocs, sets = cuda.mallocs, {b.ptr for b in [*caches.past.values(), *caches.present.values()]}
    for step in range(1, 4):
        for past, present in pairs.items():
            assert caches.past[past].ptr != caches.present[present].ptr  # TensorRT I/O must not alias
            cuda.write(caches.present[present], cuda.read(caches.past[past]).astype(np.float32) + 1)
        caches.swap()
        assert all((cuda.read(b).astype(np.float32) == step).all() for b in caches.past.values())
    assert cuda.mallocs == mallocs and cuda.copies == 0
    assert {b.ptr for b in [*caches.past.values(), *caches.present.values()]} == sets


def test_caches_take_and_concat_rows_by_device_copies():
    cuda = FakeCuda()
    pairs = {"past.0.key": "present.0.key", "past.1.key": "present.1.key"}

    def caches_of(values: np.ndarray) -> CacheBuffers:  # [B, ...] per cache, value + cache index
        shapes = {"past.0.key": values.shape, "past.1.key": values.shape}
        caches = CacheBuffers(cuda, shapes, pairs, np.float16, stream=0)
        for i, buffer in enumerate(caches.past.values()):
            cuda.write(buffer, values + 100 * i)
        return caches

    a = np.arange(3 * 2 * 4 * 3, dtype=np.float16).reshape(3, 2, 4, 3)
    b = -np.arange(1 * 2 * 4 * 3, dtype=np.float16).reshape(1, 2, 4, 3)
    first, second = caches_of(a), caches_of(b)
    kept = first.take(np.array([2, 0]))
    joined = kept.concat(second)
    assert kept.batch == 2 and joined.batch == 3 and cuda.syncs == 2
    for i, name in enumerate(pairs):
        np.testing.assert_array_equal(cuda.read(kept.past[name]), a[[2, 0]] + 100 * i)
        np.testing.assert_array_equal(cuda.read(joined.past[name]), np.concatenate([a[[2, 0]], b]) + 100 * i)
        assert joined.present[pairs[name]].shape == (3, 2, 4, 3)
    longer = CacheBuffers(cuda, {n: (1, 2, 8, 3) for n in pairs}, pairs, np.float16, stream=0)
    with pytest.raises(RunnerError, match=r"^trt: cannot join caches of different shapes"):
        first.concat(longer)


def test_step_buffers_reuse_device_and_host_memory_and_grow_on_a_longer_step():
    cuda = FakeCuda()
    steps = StepBuffers(cuda, {"seq_len": np.dtype(np.int64), "logits": np.dtype(np.float16)})
    prefill = steps.upload("seq_len", np.array([6, 4]), stream=0)
    decode = steps.upload("seq_len", np.array([1, 1]), stream=0)
    assert decode is prefill and cuda.mallocs == 1
    np.testing.assert_array_equal(cuda.read(decode), [1, 1])
    with pytest.raises(RunnerError, match=r"input 'seq_len' is int32, the engine takes int64"):
        steps.upload("seq_len", np.array([1, 1], np.int32), stream=0)

    logits = steps.buffer("logits", (2, 6, 5))  # prefill: S = 6
    values = np.arange(60, dtype=np.float16).reshape(2, 6, 5)
    cuda.write(logits, values)
    np.testing.assert_array_equal(steps.download("logits", stream=0), values)
    host = steps.host["logits"]
    logits = steps.buffer("logits", (2, 1, 5))  # decode: the same device and host memory
    cuda.write(logits, values[:, :1])
    got = steps.download("logits", stream=0)
    assert got.shape == (2, 1, 5) and np.shares_memory(got, host) and cuda.mallocs == 2
    np.testing.assert_array_equal(got, values[:, :1])
    steps.buffer("logits", (2, 8, 5))  # a longer step than any before: both grow
    assert steps.download("logits", stream=0).shape == (2, 8, 5) and steps.host["logits"] is not host
    assert cuda.mallocs == 3 and len(cuda.heap) == 2


class OrtDecoder:
    """Reference driver: embed.onnx + decoder.onnx on onnxruntime CPU with numpy caches (fp16/fp32 exports)."""

    def __init__(self, export_dir: Path):
        import onnxruntime as ort

        self.meta = json.loads((export_dir / "export.json").read_text())
        self.embed = ort.InferenceSession(str(export_dir / "embed.onnx"), providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(
            str(export_dir / "decoder.onnx"), providers=["CPUExecutionProvider"]
        )
        self.dtype = {"fp16": np.float16, "fp32": np.float32}[self.meta["dtype"]]
        self.inputs = {i.name for i in self.decoder.get_inputs()}

    def generate(self, ids: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        B, S = ids.shape
        max_len, window = S + steps, self.meta["dims"]["sliding_cache_len"]
        caches = {}
        for c in self.meta["caches"]:
            slots = window if c["slots"] == "sliding_cache_len" else max_len
            for name in c["past"]:
                caches[name] = np.zeros((B, c["num_kv_heads"], slots, c["head_dim"]), self.dtype)
        past_len = np.zeros(B, np.int64)
        tokens, chosen, step_ids = [], [], ids
        for _ in range(steps):
            seq = np.full(B, step_ids.shape[1], np.int64)
            embeds = dict(
                zip([o.name for o in self.embed.get_outputs()], self.embed.run(None, {"input_ids": step_ids}))
            )
            feeds = {k: v for k, v in embeds.items() if k in self.inputs} | caches
            out = dict(
                zip(
                    [o.name for o in self.decoder.get_outputs()],
                    self.decoder.run(None, feeds | {"past_len": past_len, "seq_len": seq}),
                )
            )
            for c in self.meta["caches"]:
                for past, present in zip(c["past"], c["present"]):
                    caches[past] = out[present]
            past_len = past_len + seq
            last = out["logits"][:, -1]
            chosen.append(last)
            step_ids = last.argmax(-1)[:, None].astype(np.int64)
            tokens.append(step_ids[:, 0])
        return np.stack(tokens, 1), np.stack(chosen, 1)


def _libcudart():
    try:
        return cuda_runtime()
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.skipif(DEVICE_SM is not None, reason="this machine has a CUDA GPU")
def test_the_real_cuda_seam_reports_a_failing_call_in_one_line():
    """libcudart through ctypes on a machine without a usable GPU: each call fails with CUDA's own reason."""
    cuda = _libcudart()
    with pytest.raises(RunnerError, match=r"^trt: cudaMalloc failed: CUDA error \d+ \(.+\)$"):
        DeviceArray(cuda, (4,), np.float16)
    with pytest.raises(RunnerError, match=r"^trt: cudaStreamCreate failed: CUDA error \d+ \(.+\)$"):
        cuda.new_stream()


@pytest.mark.skipif(DEVICE_SM is None, reason="needs a CUDA GPU (real device memory)")
def test_the_real_cuda_seam_zeroes_copies_and_grows_device_memory():
    cuda = _libcudart()
    stream = cuda.new_stream()
    host = (np.arange(24, dtype=np.float32) - 5.5).astype(ml_dtypes.bfloat16).reshape(2, 3, 4)
    buffer = DeviceArray(cuda, (2, 3, 4), ml_dtypes.bfloat16)
    back = np.full((2, 3, 4), 7, ml_dtypes.bfloat16)
    buffer.zero(stream)
    buffer.download(back, stream)
    cuda.synchronize(stream)
    assert (back.view(np.uint16) == 0).all()
    buffer.upload(host, stream)
    buffer.download(back, stream)
    cuda.synchronize(stream)
    np.testing.assert_array_equal(back.view(np.uint16), host.view(np.uint16))
    buffer.upload(np.concatenate([host, host]), stream)  # grows: a new allocation
    assert buffer.allocations == 2 and buffer.shape == (4, 3, 4)
    cuda.synchronize(stream)


def test_the_runner_step_on_fake_device_memory_equals_onnxruntime(synthetic_exports):
    """TrtRunner's _new_caches/_step/_bind over FakeCuda and an onnxruntime-backed fake context gives the logits
    of a plain onnxruntime decode loop, bit for bit, past the sliding window; after the prefill, decode steps
    allocate nothing. (TensorRT and real device memory: the GPU tests below.)"""
    out = synthetic_exports["fp16"]
    cuda = FakeCuda()
    runner = runner_on_fakes(out, cuda)
    ids = np.array([[3, 9, 27, 5, 1, 60], [8, 8, 2, 40, 11, 7]], dtype=np.int64)  # 6 tokens > window 4
    ref_tokens, ref_logits = OrtDecoder(out).generate(ids, steps=5)
    state = runner.start(2, 6 + 5)
    last = runner.step(state, ids, np.full(2, 6))[:, -1]
    mallocs, tokens, chosen = cuda.mallocs, [], []
    for i in range(5):
        assert last.dtype == np.float32
        chosen.append(last)
        tokens.append(last.argmax(-1))
        if i < 4:
            last = runner.step(state, tokens[-1][:, None], np.ones(2, np.int64))[:, 0]
    np.testing.assert_array_equal(np.stack(chosen, 1), ref_logits.astype(np.float32))
    np.testing.assert_array_equal(np.stack(tokens, 1), ref_tokens)
    assert cuda.mallocs == mallocs


def _build_native(out: Path) -> None:
    from gemma4_compile.engines import build_engines

    try:
        build_engines(out, ["native"], max_batch=2, max_seq=32, progress=False)
    except BuildError as e:
        pytest.skip(f"no installed TensorRT builds this GPU: {e}")


@needs_gpu_trt
def test_trt_matches_onnxruntime_on_the_synthetic_export(fresh_export):
    out = fresh_export("fp16")
    _build_native(out)
    runner = TrtRunner(out, "native")
    ids = np.array([[3, 9, 27, 5, 1, 60], [8, 8, 2, 40, 11, 7]], dtype=np.int64)  # 6 tokens > window 4
    tokens, logits = runner.generate_with_logits(ids, steps=6)
    ref_tokens, ref_logits = OrtDecoder(out).generate(ids, steps=6)
    np.testing.assert_allclose(logits, ref_logits, atol=5e-2, rtol=0)
    assert (tokens == ref_tokens).mean() >= 0.9


@needs_gpu_trt
@pytest.mark.skipif(not has_exporter(), reason="gemma4_compile.export is not available")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_trt_matches_torch_on_a_tiny_checkpoint(real_exports, dtype):
    from gemma4_compile.validate.reference import TorchRunner

    out = real_exports("tiny-e2b", dtype)
    _build_native(out)
    runner = TrtRunner(out, "native")
    reference = TorchRunner(out.parent / "ckpt-tiny-e2b", dtype)
    ids = np.random.default_rng(0).integers(0, runner.spec.vocab_size, size=(2, 12))  # 12 > window 8
    lengths = np.array([12, 9])
    got = runner.logits(ids, lengths)
    want = reference.logits(ids, lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], want[b, :n], atol=0.25, rtol=0)
    assert (runner.generate(ids, 4, lengths) == reference.generate(ids, 4, lengths)).mean() >= 0.75


def test_continuous_batching_moves_trt_cache_rows_on_the_device(synthetic_exports, run_batched):
    """The serving engine over TrtRunner (fakes as above): rows join a running batch and leave it through
    CacheBuffers.take/concat, and each prompt gets the tokens it gets alone."""

    runner = runner_on_fakes(synthetic_exports["fp16"], FakeCuda())
    prompts = [[3, 9, 27, 5, 1, 60], [8, 8, 2, 40, 11, 7, 30], [5, 6], [12, 13, 14, 15, 16]]  # > window 4
    budgets = [7, 3, 9, 4]
    out, engine = run_batched(runner, prompts, budgets, max_batch=2, max_len=24, timeout=60)
    assert engine.active == 0
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        assert out[i] == runner.generate(np.array([p]), n)[0].tolist(), i


def test_take_rows_and_join_states_carry_positions_with_the_device_rows(synthetic_exports):
    """The runner interface the serving engine batches through: rows of two states, joined, decode as they
    would have in their own states; bad rows and states of other cache lengths are one-line errors."""
    runner = runner_on_fakes(synthetic_exports["fp16"], FakeCuda())
    a, b = runner.start(2, 12), runner.start(1, 12)
    first = runner.step(a, np.array([[3, 9, 27, 5, 1, 60], [8, 8, 2, 40, 11, 7]]), np.array([6, 4]))
    second = runner.step(b, np.array([[5, 6, 12]]), np.array([3]))
    joined = runner.join_states([runner.take_rows(a, np.array([1])), b])
    assert joined.past_len.tolist() == [4, 3] and joined.caches.batch == 2 and joined.runner is runner
    nxt = np.array([[first[1, 3].argmax()], [second[0, 2].argmax()]])
    got = runner.step(joined, nxt, np.ones(2, np.int64))[:, 0]
    want_a = runner.step(a, np.array([[0], nxt[0]]), np.ones(2, np.int64))[1, 0]
    want_b = runner.step(b, nxt[1:], np.ones(1, np.int64))[0, 0]
    np.testing.assert_allclose(got, np.stack([want_a, want_b]), atol=1e-3, rtol=0)
    with pytest.raises(RunnerError, match=r"^trt: rows must be indices in \[0, 2\), got \[2\]$"):
        runner.take_rows(a, np.array([2]))
    with pytest.raises(
        RunnerError, match=r"^trt: states to join must share one cache length, got \[12, 16\]$"
    ):
        runner.join_states([a, runner.start(1, 16)])
