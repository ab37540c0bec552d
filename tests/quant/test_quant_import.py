"""Pre-quantized checkpoints (compressed-tensors `pack-quantized` int4): exported as stored, never re-rounded.

The checkpoints are written here from the documented format with a packer of this file's own (codes + 8, eight
per int32, the lowest column in the lowest nibble), independent of the project's unpacker and encoders. The
exports must hold the checkpoint's codes and scales bit for bit (MatMulNBits for onnxruntime, INT4
DequantizeLinear for TensorRT) and match the PyTorch model of the checkpoint's own dequantized weights at the
validation tolerances, on the default cases (prompts up to 3W + 3, decode past the sliding window).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from quant_support import written_by_role
from safetensors.torch import load_file, save_file

from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_ERROR
from gemma4_compile.export import ExportManifest, export_checkpoint
from gemma4_compile.model.config import Gemma4Spec
from gemma4_compile.model.presets import PRESETS
from gemma4_compile.quant.encode import encode_rows
from gemma4_compile.quant.formats import LINEAR_ROLES, QuantRequest, role_of
from gemma4_compile.quant.imported import unpack_int4
from gemma4_compile.quant.sizes import plan_sizes
from gemma4_compile.validate.validate import validate

PREFIX = "model.language_model."
STEPS = 4


def _quantize(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors' symmetric int4 rule: scale = absmax / 7.5 per group (stored bf16), codes =
    clamp(round(w / scale), -8, 7). Returns (codes int8 [N, K], scales float32 of the bf16 values [N, blocks])."""
    n, k = w.shape
    blocks = -(-k // group)
    padded = np.zeros((n, blocks * group), dtype=np.float32)
    padded[:, :k] = w
    g = padded.reshape(n, blocks, group)
    scales = torch.from_numpy(np.abs(g).max(axis=2) / 7.5).to(torch.bfloat16).float().numpy()
    codes = np.clip(np.rint(g / scales[..., None]), -8, 7).astype(np.int8)
    return codes.reshape(n, -1)[:, :k], scales


def _pack(codes: np.ndarray) -> np.ndarray:
    """int8 codes [N, K] -> int32 [N, ceil(K/8)]: value + 8 in 4 bits, column 8j+i in bits 4i..4i+3 of word j."""
    n, k = codes.shape
    u = np.zeros((n, -(-k // 8) * 8), dtype=np.uint32)
    u[:, :k] = codes.astype(np.int32) + 8
    words = np.zeros((n, u.shape[1] // 8), dtype=np.uint32)
    for i in range(8):
        words |= u[:, i::8] << np.uint32(4 * i)
    return words.view(np.int32)


def quant_config(group: int) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    weights.update(dynamic=False, actorder=None, observer="minmax", block_structure=None)
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None, "format": None}
        },
        "ignore": ["lm_head", "re:.*embed.*", "re:.*router.*", "re:.*per_layer.*"],
        "kv_cache_scheme": None,
    }


def write_packed(src: Path, dst: Path, group: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A copy of the float checkpoint `src` in the pack-quantized layout (every attention / MLP Linear, the
    KV-shared layers' unused K/V too); returns our name -> (codes, scales) as written."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    out, written = {}, {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        if role_of(name) not in LINEAR_ROLES:
            out[key] = t
            continue
        codes, scales = _quantize(t.float().numpy(), group)
        base = key.removesuffix(".weight")
        out[f"{base}.weight_packed"] = torch.from_numpy(_pack(codes))
        out[f"{base}.weight_scale"] = torch.from_numpy(scales).to(torch.bfloat16)
        out[f"{base}.weight_shape"] = torch.tensor(t.shape, dtype=torch.int32)
        written[name] = (codes, scales)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quant_config(group)
    (dst / "config.json").write_text(json.dumps(config))
    return written


@pytest.fixture(scope="module")
def packed(make_checkpoint, tmp_path_factory):
    """packed(preset, group) -> (checkpoint dir, our name -> (codes, scales)) (cached)."""
    cache: dict = {}

    def make(preset: str, group: int):
        if (preset, group) not in cache:
            dst = tmp_path_factory.mktemp("packed") / f"{preset}-g{group}"
            cache[preset, group] = dst, write_packed(make_checkpoint(preset), dst, group)
        return cache[preset, group]

    return make


@pytest.fixture(scope="module")
def imported(packed, tmp_path_factory):
    """imported(preset, group, dtype) -> export of the packed checkpoint, --quant implied (cached)."""
    cache: dict = {}

    def make(preset: str, group: int, dtype: str) -> Path:
        if (preset, group, dtype) not in cache:
            out = tmp_path_factory.mktemp("imported") / f"{preset}-g{group}-{dtype}"
            export_checkpoint(packed(preset, group)[0], out, dtype=dtype, max_seq_len=128)
            cache[preset, group, dtype] = out
        return cache[preset, group, dtype]

    return make


def exported(export: Path) -> dict[str, tuple[bytes, bytes]]:
    """Our name -> (codes bytes, scales bytes) of every quantized decoder initializer, as in weights.data."""
    proto = onnx.load(str(export / "decoder.onnx"), load_external_data=False)
    raw = (export / "weights.data").read_bytes()
    found: dict[str, dict[str, bytes]] = {}
    for init in proto.graph.initializer:
        stem, _, suffix = init.name.rpartition("_")
        if suffix not in ("Q4", "scales"):
            continue
        where = {e.key: e.value for e in init.external_data}
        start = int(where["offset"])
        data = raw[start : start + int(where["length"])]
        found.setdefault(stem.removeprefix("model."), {})[suffix] = data
    return {name: (d["Q4"], d["scales"]) for name, d in found.items()}


def expected_bytes(codes: np.ndarray, scales: np.ndarray, group: int, nbits: bool, dtype: str) -> tuple:
    """The graph's bytes of (codes, scales), from the definitions: MatMulNBits stores q + 8, ONNX INT4 q's two's
    complement, two per byte, the lower k in the low nibble, K padded with code 0 to whole blocks."""
    n, k = codes.shape
    padded = np.zeros((n, scales.shape[1] * group), dtype=np.int16)
    padded[:, :k] = codes
    u = (padded + 8 if nbits else padded & 0xF).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    scale_dtype = np.float32 if nbits else {"fp16": np.float16, "fp32": np.float32}[dtype]
    return packed.tobytes(), scales.astype(scale_dtype).tobytes()


def swapped(codes: np.ndarray) -> np.ndarray:
    """The nibble-order bug: the two codes of every pair of columns trade places."""
    n, k = codes.shape
    return codes.reshape(n, k // 2, 2)[:, :, ::-1].reshape(n, k)


# onnxruntime's form (fp32: MatMulNBits) and TensorRT's (fp16: INT4 DequantizeLinear), two presets, two groups
CASES = [("tiny-e2b", 32, "fp32"), ("tiny-31b", 64, "fp16")]


@pytest.mark.slow  # an export each (about 15 s of CPU), shared with the next test
@pytest.mark.parametrize("preset,group,dtype", CASES)
def test_the_checkpoint_codes_and_scales_are_exported_bit_for_bit(packed, imported, preset, group, dtype):
    out = imported(preset, group, dtype)
    written = packed(preset, group)[1]
    m = ExportManifest.load(out)
    q = m.quant
    assert (q.method, q.source, q.block_size, q.format) == (
        "imported",
        "compressed-tensors pack-quantized",
        group,
        "int4",
    )
    nbits = dtype == "fp32"
    assert q.graph == ("com.microsoft.MatMulNBits" if nbits else "DequantizeLinear")
    got = exported(out)
    used = {n for n in written if n in q.tensors}
    assert used and set(got) == used == set(q.tensors)  # the KV-shared layers' unused K/V are not exported
    assert q.roles["lm_head"] == dtype and "embed_rows" not in q.tensors  # ignored tensors stay float
    for name in sorted(used):
        codes, scales = written[name]
        assert got[name] == expected_bytes(codes, scales, group, nbits, dtype), name
    # not re-rounded: the project's own RTN of the dequantized weights gives other codes and scales
    codes, scales = written[sorted(used)[0]]
    deq = (codes.reshape(codes.shape[0], -1, group) * scales[..., None]).reshape(codes.shape)
    rtn_codes, rtn_scales = encode_rows("int4", deq, group, q.graph)
    assert got[sorted(used)[0]] != (
        rtn_codes,
        rtn_scales.astype(np.float32 if nbits else np.float16).tobytes(),
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset,group,dtype", CASES)
def test_validate_passes_against_the_checkpoints_own_weights(imported, preset, group, dtype):
    out = imported(preset, group, dtype)
    report = validate(out, steps=STEPS, write=False)
    assert report.passed, report.failure_message()
    window = ExportManifest.load(out).spec.sliding_window
    assert max(max(c.lengths) for c in report.cases) > 2 * window  # prompts longer than the sliding window


@pytest.mark.slow  # shares the exports above
@pytest.mark.parametrize("preset,group,dtype", CASES)
def test_inspect_predicts_the_imported_layout_and_the_bytes_the_export_writes(
    packed, imported, preset, group, dtype
):
    """`inspect CKPT` reads only config.json and the safetensors headers: the quantization record it plans is
    the one the export writes, and each role's bytes are those laid out in weights.data."""
    ckpt = packed(preset, group)[0]
    plan = plan_sizes(Gemma4Spec.from_pretrained(ckpt), QuantRequest(), dtype, ckpt)
    out = imported(preset, group, dtype)
    assert plan.quant.to_dict() == ExportManifest.load(out).quant.to_dict()
    predicted = {r.role: r.after for r in plan.rows if r.after}
    assert predicted == written_by_role(out)
    assert {"attn_q", "mlp_down", "embed"} <= set(predicted)


def test_inspect_prints_the_imported_layout(packed, capsys):
    """No --quant needed: the checkpoint's own int4 layout, its source, group size and per-role formats."""
    assert main(["inspect", str(packed("tiny-e2b", 32)[0]), "--dtype", "fp16"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "method imported: int4 as stored (compressed-tensors pack-quantized), group size 32" in flat
    assert "at fp16 (DequantizeLinear, min sm75)" in flat
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert all("int4" in rows[r] for r in LINEAR_ROLES), rows
    assert all("fp16" in rows[r] for r in ("lm_head", "embed", "ple_table", "ple_proj")), rows


@pytest.mark.slow
def test_a_nibble_order_bug_in_the_reference_loader_fails_validation(packed, imported, monkeypatch):
    """The torch model's loader reading the high nibble first: the export is right, the reference is not."""
    import gemma4_compile.model.weights as model_weights

    out = imported("tiny-e2b", 32, "fp32")
    monkeypatch.setattr(model_weights, "unpack_int4", lambda words, k: swapped(unpack_int4(words, k)))
    assert not validate(out, steps=1, write=False).passed


def _write_one(ckpt: Path, name: str, group: int, dtype: str, out: Path):
    """write_weight_file on one packed weight of `ckpt`: (its placement, the bytes written)."""
    import gemma4_compile.export.weights as export_weights
    from gemma4_compile.model.weights import CheckpointReader, checkpoint_quant, resolve_text_weights
    from gemma4_compile.quant.formats import QuantRequest, plan_imported

    entries = resolve_text_weights(CheckpointReader(ckpt), PRESETS["tiny-e2b"], checkpoint_quant(ckpt))
    request = QuantRequest("int4", group, method="imported")
    quant = plan_imported(request, [name], {name}, dtype, "test")
    out.mkdir()
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    q = export_weights.write_weight_file(out, {name: entries[name]}, torch_dtype, quant=quant)[name]
    data = (out / "weights.data").read_bytes()
    return data[q.codes.offset : q.codes.offset + q.codes.length], data[q.scales.offset :]


@pytest.mark.parametrize("group,dtype", [(32, "fp32"), (64, "fp16")])
def test_a_nibble_order_bug_in_the_export_changes_the_bytes(packed, tmp_path, monkeypatch, group, dtype):
    """The writer alone, on down_proj (K = 96: with group 64 a partial last group, padded with code 0): the
    checkpoint's bytes as the graph form stores them, and not once its unpacker reads the high nibble first."""
    import gemma4_compile.export.weights as export_weights

    ckpt, written = packed("tiny-e2b", group)
    name = "layers.0.mlp.down_proj.weight"
    want = expected_bytes(*written[name], group, dtype == "fp32", dtype)
    assert _write_one(ckpt, name, group, dtype, tmp_path / "good") == want
    monkeypatch.setattr(export_weights, "unpack_int4", lambda words, k: swapped(unpack_int4(words, k)))
    assert _write_one(ckpt, name, group, dtype, tmp_path / "bad") != want


def test_a_scale_the_tensorrt_form_cannot_hold_is_refused(packed, tmp_path):
    """DequantizeLinear needs positive scales: a negative one is named (the MatMulNBits form takes it)."""
    from gemma4_compile.errors import ExportError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(packed("tiny-e2b", 32)[0], ckpt)
    key = PREFIX + "layers.0.mlp.down_proj.weight_scale"
    _edit_tensors(ckpt, lambda t: t.__setitem__(key, -t[key]))
    name = "layers.0.mlp.down_proj.weight"
    _write_one(ckpt, name, 32, "fp32", tmp_path / "nbits")
    with pytest.raises(
        ExportError, match=r"'model.language_model.layers.0.mlp.down_proj.weight' has a scale <= 0"
    ):
        _write_one(ckpt, name, 32, "fp16", tmp_path / "dq")


def _edit_config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    for key, value in changes.items():
        if key in ("quant_method", "format", "kv_cache_scheme"):
            qc[key] = value
        else:
            qc["config_groups"]["group_0"]["weights"][key] = value
    (ckpt / "config.json").write_text(json.dumps(config))


def _edit_tensors(ckpt: Path, change) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    change(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


SHAPE = PREFIX + "layers.0.mlp.up_proj.weight_shape"
REFUSALS = [
    ({"quant_method": "awq", "bits": 4}, [], "quant_method=awq"),
    ({"format": "naive-quantized"}, [], "format 'naive-quantized'"),
    ({"num_bits": 8}, [], "num_bits=8"),
    ({"symmetric": False}, [], "asymmetric weights"),
    ({"actorder": "group"}, [], "actorder=group"),
    ({"strategy": "channel", "group_size": None}, [], "strategy=channel"),
    ({"group_size": 16}, [], "group_size=16"),
    ({"kv_cache_scheme": {"num_bits": 8}}, [], "kv_cache_scheme"),
    ({}, ["--quant", "int8"], "--quant int8 would re-round it"),
    ({}, ["--quant", "int4", "--block-size", "64"], "--block-size 64 would re-round it"),
    ({}, ["--quant", "int4", "--quant-method", "mse"], "--quant-method do not apply"),
    (
        {},
        ["--quant", "int4", "--quant-override", "lm_head=int4"],
        "--quant-override and --quant-method do not",
    ),
    ({}, ["--quant-keep", "attn_q"], "--quant-keep, --quant-override"),
]


def _refused(verb: str, ckpt: Path, args: list[str], tmp_path: Path, capsys) -> str:
    """Run `export` / `inspect` on `ckpt`: exit 1, nothing written or printed but one line on stderr."""
    out = tmp_path / "out"
    argv = [verb, str(ckpt), *(["-o", str(out)] if verb == "export" else []), *args]
    assert main(argv) == EXIT_ERROR
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and not captured.out and not out.exists(), (lines, captured.out)
    return lines[0]


@pytest.mark.parametrize("verb", ["export", "inspect"])
@pytest.mark.parametrize("config,args,message", REFUSALS)
def test_what_cannot_be_imported_is_refused_in_one_line(
    packed, tmp_path, capsys, verb, config, args, message
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(packed("tiny-e2b", 32)[0], ckpt)
    _edit_config(ckpt, **config)
    line = _refused(verb, ckpt, args, tmp_path, capsys)
    assert message in line and "pack-quantized" in line, line


def _bad_shape(t: dict) -> None:
    t[SHAPE] = torch.tensor([int(t[SHAPE][0]), int(t[SHAPE][1]) + 8], dtype=torch.int32)


def _zero_point(t: dict) -> None:
    t[SHAPE.replace("weight_shape", "weight_zero_point")] = torch.zeros(4, dtype=torch.int32)


@pytest.mark.parametrize(
    "change,message",
    [(_bad_shape, "weight_packed is I32"), (_zero_point, "holds zero points")],
)
@pytest.mark.parametrize("verb", ["export", "inspect"])
def test_packed_tensors_that_disagree_are_refused_in_one_line(
    packed, tmp_path, capsys, verb, change, message
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(packed("tiny-e2b", 32)[0], ckpt)
    _edit_tensors(ckpt, change)
    line = _refused(verb, ckpt, [], tmp_path, capsys)
    assert message in line and "pack-quantized" in line, line
