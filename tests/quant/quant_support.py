"""Helpers the quantization tests share (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np


def swap_nibbles(raw: np.ndarray) -> np.ndarray:
    """The packing bug a layout change makes: the two 4-bit codes of every byte trade places."""
    return (raw >> 4) | (raw << 4)
