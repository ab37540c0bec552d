"""The streaming weight writer across chunk boundaries: a tensor read in many chunks (one reused buffer) comes
out byte for byte as torch converts it whole, in the same and in another dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from gemma4_compile.export import weights as writer
from gemma4_compile.model.weights import read_safetensors_header


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_chunked_write_matches_a_whole_conversion(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(
        writer, "CHUNK_BYTES", 24
    )  # 6 fp32 values a read: 1001 values leave a short last chunk
    source = torch.randn(7, 143, generator=torch.Generator().manual_seed(0))
    save_file({"w": source}, tmp_path / "w.safetensors")
    entry = read_safetensors_header(tmp_path / "w.safetensors")["w"]
    with open(tmp_path / "out.bin", "wb") as dst:
        written = writer._write_converted(entry, dst, dtype)
    expected = source.to(dtype).view(torch.uint8).numpy().tobytes()
    assert written == len(expected) and (tmp_path / "out.bin").read_bytes() == expected
