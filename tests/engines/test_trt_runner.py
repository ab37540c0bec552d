"""TrtRunner: refuses cleanly without a GPU; on a GPU with TensorRT, agrees with onnxruntime on the same export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from engines_support import DEVICE_SM, has_exporter, needs_gpu_trt

from gemma4_compile.errors import BackendUnavailable, BuildError
from gemma4_compile.runners.trt import EmbedGraph, TrtRunner


@pytest.mark.skipif(DEVICE_SM is not None, reason="this machine has a CUDA GPU")
def test_without_a_gpu_construction_says_why(synthetic_exports):
    with pytest.raises(BackendUnavailable, match=r"^trt: needs a CUDA GPU \(the CUDA driver reports none"):
        TrtRunner(synthetic_exports["fp16"], "sm89")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_embed_stage_on_the_synthetic_export(synthetic_exports, dtype):
    """The CPU half of TrtRunner: embed.onnx -> torch tensors of the export dtype (bf16 too)."""
    import onnx
    import torch
    from onnx import numpy_helper

    out = synthetic_exports[dtype]
    embed = EmbedGraph(out / "embed.onnx")
    ids = np.array([[0, 5, 63], [7, 7, 1]])
    got = embed.run(ids)
    assert set(got) == {"inputs_embeds", "per_layer_tokens"}
    want_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert got["inputs_embeds"].dtype == want_dtype and tuple(got["per_layer_tokens"].shape) == (2, 3, 3, 4)
    model = onnx.load(str(out / "embed.onnx"))
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "embed_tokens"))
    expected = torch.from_numpy(np.asarray(table, dtype=np.float32)[ids])  # a plain gather
    assert torch.equal(got["inputs_embeds"].float(), expected)


@pytest.mark.skipif(not has_exporter(), reason="gemma4_compile.export is not available")
def test_embed_stage_matches_the_model_for_a_bf16_export(real_exports):
    """onnxruntime's CPU provider has no bf16 Mul, so bf16 embeds run on onnx's reference evaluator."""
    import torch

    from gemma4_compile.validate.reference import TorchRunner

    out = real_exports("tiny-e2b", "bf16")
    embed = EmbedGraph(out / "embed.onnx")
    assert embed.backend == "onnx.reference"
    ids = np.array([[2, 17, 400, 9]])
    got = embed.run(ids)
    model = TorchRunner(out.parent / "ckpt-tiny-e2b", "bf16").model
    with torch.inference_mode():
        embeds, per_layer = model.embed(torch.from_numpy(ids))
    assert got["inputs_embeds"].dtype == torch.bfloat16
    torch.testing.assert_close(got["inputs_embeds"], embeds, atol=0, rtol=0)
    torch.testing.assert_close(
        got["per_layer_tokens"], per_layer.reshape(got["per_layer_tokens"].shape), atol=0, rtol=0
    )


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
