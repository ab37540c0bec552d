"""runners/huge_pages.py: which mappings get transparent huge pages, and the runner with them on and off (the same
tokens and logits, bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest

from gemma4_compile.runners import huge_pages
from gemma4_compile.runners.huge_pages import PAGE, HugePages, anonymous_ranges, new_ranges

MAPS = """\
55d0c0000000-55d0c0021000 r--p 00000000 fd:01 1234   /usr/bin/python3.11
55d0c2000000-55d0c2600000 rw-p 00000000 00:00 0      [heap]
7f0000000000-7f0000a00000 rw-p 00000000 00:00 0
7f0001000000-7f0001400000 rw-s 00000000 00:05 99     /dev/shm/x
7f0002000000-7f0002200000 rw-p 00020000 fd:01 555    /usr/lib/libfoo.so
7f0003000000-7f0003100000 r-xp 00000000 00:00 0
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0      [stack]
"""


def test_only_private_writable_anonymous_memory_and_the_heap_are_candidates():
    assert anonymous_ranges(MAPS) == [(0x55D0C2000000, 0x55D0C2600000), (0x7F0000000000, 0x7F0000A00000)]


def test_new_ranges_are_what_appeared_since_trimmed_to_whole_huge_pages():
    before = [(0, 3 * PAGE), (10 * PAGE, 11 * PAGE)]
    after = [
        (0, 7 * PAGE + 5),
        (10 * PAGE, 11 * PAGE),
        (20 * PAGE + 1, 21 * PAGE + 7),
        (30 * PAGE, 33 * PAGE),
    ]
    # the heap grew by 4 pages (its tail cut at the last whole page); the unchanged and the too-small range go
    assert new_ranges(before, after) == [(3 * PAGE, 7 * PAGE), (30 * PAGE, 33 * PAGE)]
    assert new_ranges(after, after) == []


def test_a_kernel_without_them_is_a_reason(monkeypatch, tmp_path):
    never = tmp_path / "enabled"
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "ENABLED", never)
    monkeypatch.setattr(huge_pages.sys, "platform", "linux")
    assert str(HugePages().apply()) == "off: transparent huge pages are [never] on this kernel"
    monkeypatch.setattr(huge_pages.sys, "platform", "darwin")
    assert HugePages().apply().reason == "not Linux (darwin)"


def test_new_memory_is_advised_and_collapsed_where_the_kernel_allows():
    if huge_pages.unavailable():
        pytest.skip(f"no transparent huge pages here: {huge_pages.unavailable()}")
    pages = HugePages()
    block = np.ones(24 << 20, dtype=np.uint8)  # a fresh 24 MiB anonymous mapping
    done = pages.apply()
    assert done.advised >= 16 << 20 and done.collapsed <= done.advised, done
    assert "MiB on 2 MiB pages" in str(done)
    del block


def test_beyond_the_budget_memory_is_only_advised(monkeypatch):
    if huge_pages.unavailable():
        pytest.skip(f"no transparent huge pages here: {huge_pages.unavailable()}")
    monkeypatch.setattr(huge_pages, "COLLAPSE_BUDGET", 0)
    pages = HugePages()
    block = np.ones(24 << 20, dtype=np.uint8)
    done = pages.apply()
    assert done.advised >= 16 << 20 and done.collapsed == 0, done
    del block


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-26b-a4b"])
def test_the_runner_reports_them_and_computes_the_same(make_export, preset, monkeypatch):
    """The MoE export's experts are read into the runner's memory (so they can go on huge pages) only when on."""
    from gemma4_compile.runners import ort as ort_runner
    from gemma4_compile.runners.ort import OrtRunner

    export = make_export(preset)
    on, off = OrtRunner(export, huge_pages=True), OrtRunner(export, huge_pages=False)
    assert off.huge_pages == "off" and not off._in_memory
    assert "MiB on 2 MiB pages" in on.huge_pages or on.huge_pages.startswith("off: "), on.huge_pages
    assert bool(on._in_memory) == (preset == "tiny-26b-a4b") and all(".experts." in n for n in on._in_memory)
    if preset == "tiny-26b-a4b":  # experts that would take over half the available memory stay file pages
        monkeypatch.setattr(ort_runner, "available_memory", lambda: 1 << 10)
        assert not OrtRunner(export, huge_pages=True)._in_memory
    W = on.spec.sliding_window
    ids = np.random.default_rng(3).integers(3, on.spec.vocab_size, (2, W + 5))
    lengths = np.array([W + 5, W - 3])
    got, want = (r.generate_with_logits(ids, 6, lengths) for r in (on, off))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
