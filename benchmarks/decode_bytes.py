"""Weight bytes one batch-1 decode step reads, ours vs llama.cpp, per class of weight (issue #18: where the time goes).

    python benchmarks/decode_bytes.py --work W --llama-src DIR [--configs e2b dense moe] [--results OUT]

`--work` is `cpu_vs_llamacpp.py`'s folder (W/<config>/onnx-<variant>, W/<config>/model-<type>.gguf); pairs are
that script's (fp32 / f32, int4 and int4-acc4 / q4_0). `--results`: a file holding that script's JSON line; each
pair then also gets its measured tokens/s and the weight GB/s they imply.

Ours: the decoder graph as the onnxruntime runner runs it (its rewrite, with our MoE kernels), each weight in the
form onnxruntime holds it while running. A `MatMulNBits` weight is counted as MLAS prepacks it (onnxruntime 1.31,
`SQ4BitGemmPackQuantBDataSize`): per block of B the codes, a float scale and, with int8 activations (accuracy
level 4), a float block sum with N rounded up to 16. Fused MoE experts (MoENBits' codes and scales, an fp32
MoE's stacked weights) count top_k / E of their bytes, float matmul weights all of theirs.
llama.cpp: every GGUF tensor a step reads: token_embd in full (the tied LM head), *_exps at expert_used_count /
expert_count; per_layer_token_embd is left out as our embed graph's tables are (both gather one row a token).
The KV caches are left out on both sides. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import onnx
from common import report
from onnx import helper

from gemma4_compile.passes.share_shapes import shared_decoder
from gemma4_compile.runners.ort import all_nodes

PAIRS = {"fp32": "f32", "int4": "q4_0", "int4-acc4": "q4_0"}  # cpu_vs_llamacpp.py's
MIB = 2**20


def _mlas_packed(attrs: dict) -> int:
    n, k, bits, block = attrs["N"], attrs["K"], attrs.get("bits", 4), attrs["block_size"]
    blocks = -(-k // block)
    size = n * blocks * block * bits // 8 + n * blocks * 4
    if attrs.get("accuracy_level", 0) == 4:
        size += -(-n // 16) * 16 * blocks * 4
    return size


def _nbytes(t: onnx.TensorProto) -> int:
    count = 1
    for d in t.dims:
        count *= d
    return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _classify(node: onnx.NodeProto, name: str) -> str:
    if node.op_type == "MatMulNBits":
        return "lm_head" if "embed_tokens" in name or name.startswith("lm_head") else "linear (nbits)"
    return "lm_head" if "embed_tokens" in name else "linear (float)"


# what onnxruntime folds into a constant at session start
FOLDED = ("Transpose", "Reshape", "Cast", "Identity")


def ours(export: Path) -> dict[str, float]:
    """Bytes per decode step by class, for the decoder graph as the runner rewrites it."""
    model = onnx.load_from_string(shared_decoder(export / "decoder.onnx", moe_step=True))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def weight(name: str) -> str | None:  # the initializer a matmul operand is a folded view of, if any
        while name not in inits and name in producer and producer[name].op_type in FOLDED:
            name = producer[name].input[0]
        return name if name in inits else None

    out: dict[str, float] = defaultdict(float)
    for node in all_nodes(model.graph):  # an inlined MoE body holds MoEStep in an If branch
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weights = [w for w in map(weight, node.input) if w]
        if node.op_type == "MatMulNBits" and weights:
            out[_classify(node, weights[0])] += _mlas_packed(attrs)
        elif node.op_type in ("MoENBits", "MoE", "MoEStep"):
            experts = [inits[w] for w in weights if len(inits[w].dims) >= 3]
            out["experts"] += attrs["top_k"] / experts[0].dims[0] * sum(_nbytes(t) for t in experts)
            out["linear (float)"] += sum(_nbytes(inits[w]) for w in weights if len(inits[w].dims) == 2)
        elif node.op_type in ("MatMul", "Gemm"):
            for w in weights:
                out[_classify(node, w)] += _nbytes(inits[w])
    return dict(out)


def llama(gguf: Path, llama_src: Path) -> dict[str, float]:
    sys.path.insert(0, str(llama_src / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    fields = {f.name: f for f in reader.fields.values()}

    def value(suffix: str) -> int | None:
        field = next((f for n, f in fields.items() if n.endswith(suffix)), None)
        return None if field is None else int(field.parts[field.data[0]][0])

    used, count = value(".expert_used_count"), value(".expert_count")
    out: dict[str, float] = defaultdict(float)
    for t in reader.tensors:
        if t.name.startswith("per_layer_token_embd") or len(t.shape) < 2:
            continue  # gathered rows; norms and scales (a few KB)
        if "_exps" in t.name:
            out["experts"] += t.n_bytes * used / count
        elif t.name.startswith(("token_embd", "output.")):
            out["lm_head"] += t.n_bytes
        else:
            out["linear (nbits)" if t.tensor_type.name.startswith("Q") else "linear (float)"] += t.n_bytes
    return dict(out)


def _measured(results: Path | None) -> dict[tuple, float]:
    """(config, side, variant) -> batch-1 decode tokens/s, from cpu_vs_llamacpp.py's JSON line(s)."""
    if results is None:
        return {}
    tps = {}
    for line in results.read_text().splitlines():
        if line.startswith('{"benchmark": "cpu_vs_llamacpp"'):
            for r in json.loads(line)["rows"]:
                if r.get("batch") == 1 and "decode_tps" in r:
                    tps[r["config"], r["side"], r["variant"]] = r["decode_tps"]
    return tps


def _sides(root: Path, llama_src: Path) -> list[tuple[str, str, dict[str, float]]]:
    """(side, variant, bytes by class): ours per variant present, each llama.cpp type once, after its first pair."""
    sides = []
    for variant, theirs in PAIRS.items():
        export, gguf = root / f"onnx-{variant}", root / f"model-{theirs}.gguf"
        if export.is_dir() and gguf.is_file():
            sides.append(("ours", variant, ours(export)))
            if ("llama", theirs) not in {(s, v) for s, v, _ in sides}:
                sides.append(("llama", theirs, llama(gguf, llama_src)))
    return sides


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--llama-src", type=Path, required=True)
    ap.add_argument("--configs", nargs="+", default=["e2b", "dense", "moe"])
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    tps = _measured(args.results)
    classes = ["linear (nbits)", "linear (float)", "experts", "lm_head"]
    rows, payload = [], {"benchmark": "decode_bytes", "rows": []}
    for cfg in args.configs:
        for side, name, by in _sides(args.work / cfg, args.llama_src):
            total = sum(by.values())
            speed = tps.get((cfg, side, name))
            gbs = None if speed is None else total * speed / 1e9
            measured = ["-", "-"] if speed is None else [speed, gbs]
            rows.append([cfg, side, name, *(by.get(c, 0) / MIB for c in classes), total / MIB, *measured])
            payload["rows"].append(
                {"config": cfg, "side": side, "variant": name, "bytes": by, "total": total}
                | ({} if speed is None else {"decode_tps": speed, "weight_gb_s": gbs})
            )
    report(
        "weight MiB one batch-1 decode step reads (tok/s, GB/s: from --results)",
        ["config", "side", "variant", *(f"{c} MiB" for c in classes), "total MiB", "tok/s", "GB/s"],
        rows,
        payload,
    )


if __name__ == "__main__":
    main()
