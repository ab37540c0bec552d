"""QuantizeMatMuls on a small ONNX-text graph: x @ W.T becomes MatMulNBits and computes x @ dequant(W).T."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from gemma4_compile.passes import NBitsWeight, QuantizeMatMuls, run_passes
from gemma4_compile.quant.rtn import dequantize_rows, pack_matmulnbits, quantize_rows

N, K = 24, 48


def _graph(extra: str = "") -> tuple[ir.Model, np.ndarray]:
    w = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32).round(3)
    values = ", ".join(map(str, w.ravel()))
    out = f", float[{K}, {N}] t" if extra else ""
    model = ir.from_onnx_text(f"""
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[M, {K}] x) => (float[M, {N}] y{out}) <float[{N}, {K}] w = {{{values}}}> {{
        wt = Transpose <perm = [1, 0]> (w)
        y = MatMul (x, wt)
        {extra}
    }}
    """)
    return model, w


def _nbits(w: np.ndarray, bits: int, block: int) -> tuple[NBitsWeight, np.ndarray]:
    codes, scales = quantize_rows(w, bits, block)
    weight = NBitsWeight(
        ir.tensor(pack_matmulnbits(codes, bits), name="w_Q"),
        ir.tensor(scales, name="w_scales"),
        k=K,
        n=N,
        bits=bits,
        block_size=block,
    )
    return weight, dequantize_rows(codes, scales, K)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 32)])
def test_matmul_becomes_matmulnbits_and_computes_the_dequantized_product(bits, block):
    model, w = _graph()
    weight, dq = _nbits(w, bits, block)
    p = QuantizeMatMuls({"w": weight})
    run_passes(model, [p])
    assert p.replaced == 1
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    assert set(model.graph.initializers) == {"w_Q", "w_scales"}
    assert model.opset_imports["com.microsoft"] == 1
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ dq.T, rtol=1e-5, atol=1e-5)
    assert np.abs(y - x @ w.T).max() > 1e-3  # the quantization is visible: the reference is not the float one


def test_a_weight_used_outside_matmul_is_refused():
    model, w = _graph("t = Identity (wt)")
    with pytest.raises(ir.passes.PreconditionError, match="feeds Identity"):
        QuantizeMatMuls({"w": _nbits(w, 4, 32)[0]})(model)
