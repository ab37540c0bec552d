"""Weights are what the config says: a checkpoint whose safetensors headers, tensor dtypes, values or config.json
fields the model cannot use is refused at load, through the real CLI, in one line naming the tensor or field."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_ERROR, CheckpointError
from gemma4_compile.model.weights import CheckpointReader, read_safetensors_header

SHARD = "model.safetensors"


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(ckpt: Path, change) -> None:
    header, data = read_st(ckpt / SHARD)
    change(header)
    write_st(ckpt / SHARD, header, data)


def float_tensor(header: dict) -> str:
    """The name of a float tensor of the text model with more than 4 elements."""
    return next(
        k
        for k, v in header.items()
        if k.startswith("model.language_model.") and v["dtype"] == "F32" and np.prod(v["shape"]) > 4
    )


def as_dtype(st_dtype: str, itemsize: int):
    def change(header):
        info = header[float_tensor(header)]
        info["dtype"], info["shape"] = st_dtype, [int(np.prod(info["shape"])) * 4 // itemsize]

    return change


def overlap(header):
    names = [k for k in header if k != "__metadata__"]
    a, b = header[names[0]], header[names[1]]
    b["data_offsets"] = [
        a["data_offsets"][0],
        a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0],
    ]


def past_the_end(header):
    info = header[float_tensor(header)]
    info["data_offsets"] = [info["data_offsets"][0], info["data_offsets"][1] + 10**9]


def wrong_length(header):
    info = header[float_tensor(header)]
    info["shape"] = [info["shape"][0] + 1, *info["shape"][1:]]


HEADERS = {
    "int8 weights": (as_dtype("I8", 1), "has dtype I8; the model needs F32, F16 or BF16"),
    "bool weights": (as_dtype("BOOL", 1), "has dtype BOOL; the model needs F32, F16 or BF16"),
    "overlapping byte ranges": (overlap, "overlap"),
    "range past the end": (past_the_end, "truncated: tensor"),
    "shape and bytes disagree": (wrong_length, "bytes for shape"),
    "header not an object": (lambda h: h.clear() or h.update(x=[1, 2]), "header entry is not an object"),
    "offsets not numbers": (
        lambda h: h[float_tensor(h)].update(data_offsets=["0", "8"]),
        "data_offsets must be [begin, end]",
    ),
    "unknown dtype": (lambda h: h[float_tensor(h)].update(dtype="F8_E9"), "unsupported dtype 'F8_E9'"),
}


def export_refused(ckpt: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "-o", str(out)]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "internal error" not in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    return err[0]


@pytest.mark.parametrize("case", list(HEADERS))
def test_a_bad_safetensors_header_is_refused_at_load(case, ckpt, tmp_path, capsys):
    change, expected = HEADERS[case]
    edit_header(ckpt, change)
    assert expected in export_refused(ckpt, tmp_path, capsys)


def test_a_header_that_is_not_json_is_refused(ckpt, tmp_path, capsys):
    raw = (ckpt / SHARD).read_bytes()
    (ckpt / SHARD).write_bytes(raw[:8] + b"\xff" * 16 + raw[24:])
    assert "corrupt safetensors header" in export_refused(ckpt, tmp_path, capsys)


def poison(ckpt: Path) -> str:
    """Write a NaN into a weight of the text model; returns its name."""
    header, data = read_st(ckpt / SHARD)
    name = float_tensor(header)
    start = header[name]["data_offsets"][0]
    data = bytearray(data)
    data[start + 4 : start + 8] = np.array([np.nan], np.float32).tobytes()
    write_st(ckpt / SHARD, header, bytes(data))
    return name


def test_a_non_finite_weight_is_refused_by_the_reader(ckpt):
    name = poison(ckpt)
    reader = CheckpointReader(ckpt)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' in {SHARD} holds NaN or Inf"):
        reader.load(reader.entries[name])


def test_export_of_a_poisoned_checkpoint_names_the_tensor_and_writes_nothing(ckpt, tmp_path, capsys):
    name = poison(ckpt)
    err = export_refused(ckpt, tmp_path, capsys)
    assert f"tensor '{name}'" in err and "NaN or Inf" in err


def test_a_weight_that_overflows_fp16_is_refused(ckpt, tmp_path, capsys):
    header, data = read_st(ckpt / SHARD)
    name = float_tensor(header)
    start = header[name]["data_offsets"][0]
    data = bytearray(data)
    data[start : start + 4] = np.array([1e6], np.float32).tobytes()  # finite in fp32, inf in fp16
    write_st(ckpt / SHARD, header, bytes(data))
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "-o", str(out), "--dtype", "fp16"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"tensor '{name}' overflows fp16" in err[0], err
    assert not out.exists()


def test_validate_against_a_poisoned_reference_checkpoint_names_the_tensor(make_export, ckpt, capsys):
    name = poison(ckpt)
    export = make_export("tiny-e2b")
    assert main(["validate", str(export), "--checkpoint", str(ckpt), "--steps", "1"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"tensor '{name}'" in err[0] and "NaN or Inf" in err[0], err


def edit_config(ckpt: Path, change) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    change(config["text_config"])
    (ckpt / "config.json").write_text(json.dumps(config))


CONFIGS = {
    "rms_norm_eps zero": ({"rms_norm_eps": 0}, "config field 'rms_norm_eps': must be in (0, 1)"),
    "rms_norm_eps negative": ({"rms_norm_eps": -1e-6}, "'rms_norm_eps': must be in (0, 1)"),
    "odd head_dim": ({"head_dim": 15}, "'head_dim': layer 0: head_dim 15 must be a positive even number"),
    "zero head_dim": ({"head_dim": 0}, "'head_dim': must be a positive integer"),
    "head_dim a string": ({"head_dim": "16"}, "'head_dim': expected int, got str '16'"),
    "hidden_size a bool": ({"hidden_size": True}, "'hidden_size': expected int, got bool True"),
    "window a float": ({"sliding_window": 8.5}, "'sliding_window': expected int, got float 8.5"),
    "softcap a bool": ({"final_logit_softcapping": True}, "'final_logit_softcapping': expected a number"),
    "eos a string": ({"eos_token_id": "1"}, "'eos_token_id': expected a token id"),
    "bos beyond vocab": ({"bos_token_id": 10**6}, "'bos_token_id': must be a token id in [0, 512)"),
    "positions beyond int32": ({"max_position_embeddings": 2**40}, "'max_position_embeddings': must be in"),
    "rope theta a string": (
        {"rope_parameters": {"sliding_attention": {"rope_theta": "big"}}},
        "'rope_parameters.sliding_attention.rope_theta': expected a finite number, got 'big'",
    ),
    "rope theta zero": (
        {"rope_parameters": {"sliding_attention": {"rope_theta": 0}}},
        "'rope_parameters.sliding_attention.rope_theta': must be > 1",
    ),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_config_value_that_makes_no_sense_is_refused(case, ckpt, tmp_path, capsys):
    values, expected = CONFIGS[case]
    edit_config(ckpt, lambda text: text.update(values))
    assert expected in export_refused(ckpt, tmp_path, capsys)


def test_a_binary_config_is_refused(ckpt, tmp_path, capsys):
    (ckpt / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 8)
    assert "config.json is not UTF-8 text" in export_refused(ckpt, tmp_path, capsys)


@pytest.mark.parametrize("value", ["0", "-3", str(2**31), "5000"])
def test_max_seq_len_outside_what_the_config_allows_is_refused_before_work(value, ckpt, tmp_path, capsys):
    assert "--max-seq-len must be in [1, 4096]" in export_refused_with(ckpt, tmp_path, capsys, value)


def export_refused_with(ckpt: Path, tmp_path: Path, capsys, max_seq_len: str) -> str:
    out = tmp_path / "out"
    args = ["export", str(ckpt), "-o", str(out), "--max-seq-len", max_seq_len]
    assert main(args) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    return err[0]


def test_an_intact_header_reads(tiny_checkpoint):
    entries = read_safetensors_header(tiny_checkpoint / SHARD)
    assert entries and all(e.nbytes for e in entries.values())


def test_validate_against_another_models_checkpoint_names_the_differing_field(
    make_export, make_checkpoint, capsys
):
    export, other = make_export("tiny-e2b"), make_checkpoint("tiny-e4b")
    assert main(["validate", str(export), "--checkpoint", str(other), "--steps", "1"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the exported model:" in err[0] and "in export.json" in err[0], err


def test_non_finite_reference_logits_are_blamed_on_the_reference_not_the_backend():
    from gemma4_compile.errors import ValidateError
    from gemma4_compile.validate.cases import Case
    from gemma4_compile.validate.validate import _check_finite_reference, _Run

    rows = [np.zeros((5, 8), np.float32), np.zeros((5, 8), np.float32)]
    rows[1][3, 2] = np.inf
    case = Case("long", np.zeros((2, 5), np.int64), np.array([5, 5]))

    class Reference:
        name = "torch"

    _check_finite_reference(Reference(), _Run(rows[:1], np.zeros((1, 0), np.int64)), case)
    with pytest.raises(
        ValidateError,
        match=r"reference \(torch\) produced non-finite logits in case 'long' row 1 "
        r"from position 3: the checkpoint or the reference precision is at fault",
    ):
        _check_finite_reference(Reference(), _Run(rows, np.zeros((2, 0), np.int64)), case)
