"""A small synthetic export (export-format.md) built with onnx.helper, for engine tests.

It has the real I/O contract (inputs_embeds, per_layer_tokens, past_len, seq_len, BNSH ring caches,
logits, presents) and real `gemma4::SlidingWindowAttention` nodes backed by a model-local function whose body is
the reference math of `gemma4_compile.model.ops.attention_reference` (ring caches, sliding window, GQA).
`attention_op="Attention"` gives the older op name, which TensorRT's built-in ONNX Attention importer shadows.
Layers: 0 sliding (owns cache 0), 1 global (owns cache 1), 2 global KV-shared consumer of layer 1.
`unsupported=True` adds a custom node with no function body (nothing can import it without a plugin).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "gemma4"
OPSET = 20
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _c(name: str, value, dtype=np.int64) -> onnx.NodeProto:
    arr = np.asarray(value, dtype=dtype)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))


def _slot_positions(prefix: str, length: str, slots: str) -> list[onnx.NodeProto]:
    """[B] length, scalar C -> {prefix}_slot [B, C]: position held by each ring slot (negative: empty)."""
    p = prefix
    return [
        helper.make_node("Unsqueeze", [length, "c_ax1"], [f"{p}_len2"]),
        helper.make_node("Sub", [f"{p}_len2", "c_one"], [f"{p}_last"]),
        helper.make_node("Range", ["c_zero", slots, "c_one"], [f"{p}_j"]),
        helper.make_node("Sub", [f"{p}_last", f"{p}_j"], [f"{p}_d"]),
        helper.make_node("Mod", [f"{p}_d", slots], [f"{p}_m"]),  # python-style remainder (fmod=0)
        helper.make_node("Sub", [f"{p}_last", f"{p}_m"], [f"{p}_slot"]),
    ]


def _ring_update(p: str, past: str, new: str, out: str) -> list[onnx.NodeProto]:
    """ops.ring_update: write the valid new tokens into the ring (the last C of them win)."""
    return [
        *_slot_positions(f"{p}_rs", "total_len", "C"),
        helper.make_node("GreaterOrEqual", [f"{p}_rs_slot", "past_len2"], [f"{p}_take"]),
        helper.make_node("Sub", [f"{p}_rs_slot", "past_len2"], [f"{p}_src0"]),
        helper.make_node("Max", [f"{p}_src0", "c_zero"], [f"{p}_src1"]),
        helper.make_node("Min", [f"{p}_src1", "S_minus1"], [f"{p}_src"]),
        helper.make_node("Unsqueeze", [f"{p}_src", "c_ax13"], [f"{p}_src4"]),  # [B, 1, C, 1]
        helper.make_node("Shape", [past], [f"{p}_pshape"]),
        helper.make_node("Expand", [f"{p}_src4", f"{p}_pshape"], [f"{p}_idx"]),
        helper.make_node("GatherElements", [new, f"{p}_idx"], [f"{p}_gath"], axis=2),
        helper.make_node("Unsqueeze", [f"{p}_take", "c_ax13"], [f"{p}_take4"]),
        helper.make_node("Where", [f"{p}_take4", f"{p}_gath", past], [out]),
    ]


def attention_function(op_type: str = "SlidingWindowAttention") -> onnx.FunctionProto:
    """gemma4::<op_type>(q, k, v, past_k, past_v, past_len, seq_len) {window, scale} -> out, present_k, present_v."""
    win_attr = helper.make_attribute_ref("value_int", onnx.AttributeProto.INT)
    win_attr.name, win_attr.ref_attr_name = "value_int", "window"
    scale_attr = helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT)
    scale_attr.name, scale_attr.ref_attr_name = "value_float", "scale"
    window = helper.make_node("Constant", [], ["window"])
    window.attribute.append(win_attr)
    scale = helper.make_node("Constant", [], ["scale_f"])
    scale.attribute.append(scale_attr)
    nodes = [
        _c("c_zero", 0),
        _c("c_one", 1),
        _c("c_ax1", [1]),
        _c("c_ax2", [2]),
        _c("c_ax12", [1, 2]),
        _c("c_ax13", [1, 3]),
        _c("c_i0", [0]),
        _c("c_i1", [1]),
        _c("c_i2", [2]),
        _c("c_i3", [3]),
        _c("c_neg", np.finfo(np.float32).min, np.float32),
        window,
        scale,
        # sizes
        helper.make_node("Shape", ["q"], ["qshape"]),
        helper.make_node("Shape", ["k"], ["kshape"]),
        helper.make_node("Shape", ["past_k"], ["cshape"]),
        helper.make_node("Gather", ["qshape", "c_i0"], ["B1"]),
        helper.make_node("Gather", ["qshape", "c_i1"], ["Hq1"]),
        helper.make_node("Gather", ["qshape", "c_i2"], ["S1"]),
        helper.make_node("Gather", ["qshape", "c_i3"], ["D1"]),
        helper.make_node("Gather", ["kshape", "c_i1"], ["Hkv1"]),
        helper.make_node("Gather", ["cshape", "c_i2"], ["C1"]),
        helper.make_node("Div", ["Hq1", "Hkv1"], ["G1"]),
        helper.make_node("Squeeze", ["S1", "c_i0"], ["S"]),
        helper.make_node("Squeeze", ["C1", "c_i0"], ["C"]),
        helper.make_node("Sub", ["S", "c_one"], ["S_minus1"]),
        # positions and visibility [B, S, C+S]
        helper.make_node("Range", ["c_zero", "S", "c_one"], ["s"]),
        helper.make_node("Unsqueeze", ["past_len", "c_ax1"], ["past_len2"]),  # [B, 1]
        helper.make_node("Add", ["past_len2", "s"], ["q_pos"]),  # [B, S]
        *_slot_positions("att", "past_len", "C"),
        helper.make_node("Concat", ["att_slot", "q_pos"], ["k_pos"], axis=1),
        helper.make_node("GreaterOrEqual", ["att_slot", "c_zero"], ["slot_ok"]),
        helper.make_node("Unsqueeze", ["seq_len", "c_ax1"], ["seq_len2"]),
        helper.make_node("Less", ["s", "seq_len2"], ["new_ok"]),
        helper.make_node("Concat", ["slot_ok", "new_ok"], ["k_valid"], axis=1),
        helper.make_node("Unsqueeze", ["k_pos", "c_ax1"], ["k_pos3"]),  # [B, 1, C+S]
        helper.make_node("Unsqueeze", ["q_pos", "c_ax2"], ["q_pos3"]),  # [B, S, 1]
        helper.make_node("LessOrEqual", ["k_pos3", "q_pos3"], ["causal"]),
        helper.make_node("Sub", ["q_pos3", "window"], ["lo"]),
        helper.make_node("Greater", ["k_pos3", "lo"], ["in_win"]),
        helper.make_node("Equal", ["window", "c_zero"], ["is_global"]),
        helper.make_node("Or", ["in_win", "is_global"], ["win_ok"]),
        helper.make_node("And", ["causal", "win_ok"], ["vis0"]),
        helper.make_node("Unsqueeze", ["k_valid", "c_ax1"], ["k_valid3"]),
        helper.make_node("And", ["vis0", "k_valid3"], ["visible"]),
        helper.make_node("Unsqueeze", ["visible", "c_ax12"], ["visible5"]),  # [B, 1, 1, S, C+S]
        # scores [B, Hkv, G, S, C+S] -> probs -> out [B, Hq, S, D]
        helper.make_node("Concat", ["past_k", "k"], ["keys"], axis=2),
        helper.make_node("Concat", ["past_v", "v"], ["values"], axis=2),
        helper.make_node("Unsqueeze", ["keys", "c_ax2"], ["keys5"]),
        helper.make_node("Unsqueeze", ["values", "c_ax2"], ["values5"]),
        helper.make_node("Concat", ["B1", "Hkv1", "G1", "S1", "D1"], ["qg_shape"], axis=0),
        helper.make_node("Reshape", ["q", "qg_shape"], ["qg"]),
        helper.make_node("Transpose", ["keys5"], ["keysT"], perm=[0, 1, 2, 4, 3]),
        helper.make_node("MatMul", ["qg", "keysT"], ["raw"]),
        helper.make_node("CastLike", ["scale_f", "q"], ["scale_q"]),
        helper.make_node("Mul", ["raw", "scale_q"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["scores"], to=TensorProto.FLOAT),
        helper.make_node("Where", ["visible5", "scores", "c_neg"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs32"], axis=-1),
        helper.make_node("CastLike", ["probs32", "q"], ["probs"]),
        helper.make_node("MatMul", ["probs", "values5"], ["og"]),
        helper.make_node("Reshape", ["og", "qshape"], ["out"]),
        # ring updates
        helper.make_node("Add", ["past_len", "seq_len"], ["total_len"]),
        *_ring_update("rk", "past_k", "k", "present_k"),
        *_ring_update("rv", "past_v", "v", "present_v"),
    ]
    return helper.make_function(
        DOMAIN,
        op_type,
        ["q", "k", "v", "past_k", "past_v", "past_len", "seq_len"],
        ["out", "present_k", "present_v"],
        nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=["window", "scale"],
    )


class _Weights:
    def __init__(self, dtype: str, seed: int):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.inits: list[onnx.TensorProto] = []

    def add(self, name: str, shape: tuple[int, ...], std: float | None = None) -> str:
        std = shape[0] ** -0.5 if std is None else std
        data = (self.rng.standard_normal(shape) * std).astype(np.float32)
        if self.dtype == "bf16":
            bits = (data.view(np.uint32) >> 16).astype(np.uint16)  # truncate fp32 -> bf16
            t = helper.make_tensor(name, TensorProto.BFLOAT16, shape, bits.tobytes(), raw=True)
        else:
            t = numpy_helper.from_array(data.astype(NP_DTYPES[self.dtype]), name)
        self.inits.append(t)
        return name


def _vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _io_entry(vi: onnx.ValueInfoProto) -> dict:
    t = vi.type.tensor_type
    names = {
        TensorProto.FLOAT: "float32",
        TensorProto.FLOAT16: "float16",
        TensorProto.BFLOAT16: "bfloat16",
        TensorProto.INT64: "int64",
    }
    shape = [d.dim_param or d.dim_value for d in t.shape.dim]
    return {"name": vi.name, "dtype": names[t.elem_type], "shape": shape}


def build_decoder(
    dtype: str,
    *,
    window: int = 4,
    hidden: int = 32,
    vocab: int = 64,
    unsupported: bool = False,
    seed: int = 0,
    attention_op: str = "SlidingWindowAttention",
) -> tuple[onnx.ModelProto, dict]:
    """-> (decoder model, export.json fragments: caches, custom_nodes)."""
    el = ONNX_DTYPES[dtype]
    Hq, D, L, P = 4, 8, 3, 4
    layers = [("sliding", window, 2, 0, 0), ("global", 0, 1, 1, 1), ("global", 0, 1, None, 1)]
    w = _Weights(dtype, seed)
    nodes: list[onnx.NodeProto] = [
        _c("shape_bshd", [0, 0, -1, D]),
        _c("shape_bsh", [0, 0, -1]),
        _c("cap", 30.0, np.float32),
    ]
    inputs = [
        _vi("inputs_embeds", el, ["batch", "sequence", hidden]),
        _vi("per_layer_tokens", el, ["batch", "sequence", L, P]),
        _vi("past_len", TensorProto.INT64, ["batch"]),
        _vi("seq_len", TensorProto.INT64, ["batch"]),
    ]
    outputs = [_vi("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
    caches, custom, kv = [], [], {}
    nodes += [
        helper.make_node("Reshape", ["per_layer_tokens", "shape_bsh"], ["ple_flat"]),
        helper.make_node("MatMul", ["ple_flat", w.add("ple_proj", (L * P, hidden))], ["ple"]),
        helper.make_node("Add", ["inputs_embeds", "ple"], ["x0"]),
    ]
    x = "x0"
    for i, (kind, win, hkv, cache_index, producer) in enumerate(layers):
        p = f"layers.{i}"

        def heads(src: str, n: int, name: str, p=p, nodes=nodes) -> str:
            nodes.extend(
                [
                    helper.make_node(
                        "MatMul", [src, w.add(f"{p}.{name}_proj", (hidden, n * D))], [f"{p}.{name}_flat"]
                    ),
                    helper.make_node("Reshape", [f"{p}.{name}_flat", "shape_bshd"], [f"{p}.{name}_bshd"]),
                    helper.make_node("Transpose", [f"{p}.{name}_bshd"], [f"{p}.{name}"], perm=[0, 2, 1, 3]),
                ]
            )
            return f"{p}.{name}"

        q = heads(x, Hq, "q")
        if cache_index is not None:
            k, v = heads(x, hkv, "k"), heads(x, hkv, "v")
            slots = "sliding_cache_len" if kind == "sliding" else "cache_len"
            past = [f"past_key_values.{cache_index}.key", f"past_key_values.{cache_index}.value"]
            present = [f"present.{cache_index}.key", f"present.{cache_index}.value"]
            inputs += [_vi(n, el, ["batch", hkv, slots, D]) for n in past]
            outputs += [_vi(n, el, ["batch", hkv, slots, D]) for n in present]
            kv[i] = (k, v, *past)
            caches.append(
                {
                    "index": cache_index,
                    "layer": i,
                    "kind": kind,
                    "window": win,
                    "slots": slots,
                    "num_kv_heads": hkv,
                    "head_dim": D,
                    "consumers": [],
                    "past": past,
                    "present": present,
                }
            )
            outs = [f"{p}.attn", *present]
        else:
            k, v, *past = kv[producer]
            caches[-1]["consumers"].append(i)
            outs = [f"{p}.attn", f"{p}.unused_k", f"{p}.unused_v"]
        node_name = f"/model/{p}/attn/{attention_op}"
        nodes.append(
            helper.make_node(
                attention_op,
                [q, k, v, *past, "past_len", "seq_len"],
                outs,
                name=node_name,
                domain=DOMAIN,
                window=win,
                scale=D**-0.5,
                plugin_namespace=DOMAIN,
                plugin_version="1",
            )
        )
        attrs = {"window": win, "scale": D**-0.5, "plugin_namespace": DOMAIN, "plugin_version": "1"}
        custom.append(
            {"name": node_name, "op_type": attention_op, "layer": i, "kind": kind, "attributes": attrs}
        )
        nodes += [
            helper.make_node("Transpose", [f"{p}.attn"], [f"{p}.attn_bshd"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{p}.attn_bshd", "shape_bsh"], [f"{p}.attn_flat"]),
            helper.make_node(
                "MatMul", [f"{p}.attn_flat", w.add(f"{p}.o_proj", (Hq * D, hidden))], [f"{p}.o"]
            ),
            helper.make_node("Add", [x, f"{p}.o"], [f"{p}.out"]),
        ]
        x = f"{p}.out"
    if unsupported:
        nodes.append(
            helper.make_node("Mystery", [x], ["mystery_out"], name="/model/mystery/Mystery", domain=DOMAIN)
        )
        custom.append(
            {
                "name": "/model/mystery/Mystery",
                "op_type": "Mystery",
                "layer": None,
                "kind": None,
                "attributes": {},
            }
        )
        x = "mystery_out"
    nodes += [
        helper.make_node("MatMul", [x, w.add("lm_head", (hidden, vocab))], ["raw_logits"]),
        helper.make_node("Cast", ["raw_logits"], ["logits32"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["logits32", "cap"], ["l_div"]),
        helper.make_node("Tanh", ["l_div"], ["l_tanh"]),
        helper.make_node("Mul", ["l_tanh", "cap"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, w.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=[attention_function(attention_op)],
        ir_version=10,
    )
    return model, {
        "caches": caches,
        "custom_nodes": custom,
        "window": window,
        "hidden": hidden,
        "vocab": vocab,
        "num_layers": L,
        "ple_dim": P,
    }


def build_embed(dtype: str, *, hidden: int, vocab: int, num_layers: int, ple_dim: int, seed: int = 1):
    el = ONNX_DTYPES[dtype]
    w = _Weights(dtype, seed)
    nodes = [
        _c("ple_shape", [0, 0, num_layers, ple_dim]),
        helper.make_node(
            "Gather", [w.add("embed_tokens", (vocab, hidden), 1.0), "input_ids"], ["inputs_embeds"]
        ),
        helper.make_node(
            "Gather", [w.add("embed_ple", (vocab, num_layers * ple_dim), 1.0), "input_ids"], ["ple"]
        ),
        helper.make_node("Reshape", ["ple", "ple_shape"], ["per_layer_tokens"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embed",
        [_vi("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [
            _vi("inputs_embeds", el, ["batch", "sequence", hidden]),
            _vi("per_layer_tokens", el, ["batch", "sequence", num_layers, ple_dim]),
        ],
        w.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_synthetic_export(
    out: Path,
    dtype: str = "fp16",
    *,
    max_seq_len: int = 64,
    unsupported: bool = False,
    window: int = 4,
    attention_op: str = "SlidingWindowAttention",
) -> Path:
    """Write OUT/{export.json, embed.onnx, decoder.onnx, *.onnx.data} as the exporter would."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    decoder, info = build_decoder(dtype, unsupported=unsupported, window=window, attention_op=attention_op)
    embed = build_embed(
        dtype,
        hidden=info["hidden"],
        vocab=info["vocab"],
        num_layers=info["num_layers"],
        ple_dim=info["ple_dim"],
    )
    graphs = {}
    for name, model in (("embed", embed), ("decoder", decoder)):
        path = out / f"{name}.onnx"
        onnx.save(model, path, save_as_external_data=True, location=f"{name}.onnx.data", size_threshold=0)
        graphs[name] = {
            "file": path.name,
            "sha256": _sha256(path),
            "external_data": [f"{name}.onnx.data"],
            "inputs": [_io_entry(v) for v in model.graph.input],
            "outputs": [_io_entry(v) for v in model.graph.output],
        }
    files = {f.name: _sha256(f) for f in sorted(out.iterdir()) if f.suffix in (".onnx", ".data")}
    manifest = {
        "format": "gemma4-compile/export",
        "version": 1,
        "dtype": dtype,
        "opset": OPSET,
        "max_seq_len": max_seq_len,
        "spec": {
            "synthetic": True,
            "hidden_size": info["hidden"],
            "vocab_size": info["vocab"],
            "sliding_window": window,
        },
        "graphs": graphs,
        "dims": {
            "batch": "dynamic",
            "sequence": "dynamic",
            "sliding_cache_len": window,
            "cache_len": f"dynamic, <= {max_seq_len}",
        },
        "caches": info["caches"],
        "custom_nodes": info["custom_nodes"],
        "files": files,
        "tools": {"gemma4_compile": "synthetic", "onnx": onnx.__version__},
    }
    (out / "export.json").write_text(json.dumps(manifest, indent=2))
    return out
