"""Ctrl-C during a TensorRT build cancels it through the progress monitor and surfaces as KeyboardInterrupt."""

from __future__ import annotations

import signal

import pytest

from gemma4_compile.engines.progress import interruptible, make_monitor


def test_sigint_sets_the_event_and_raises_after_the_block():
    reached_end_of_block = False
    with pytest.raises(KeyboardInterrupt), interruptible() as cancel:
        signal.raise_signal(signal.SIGINT)  # to this thread, so the handler has run on return
        assert cancel.is_set()
        reached_end_of_block = True
    assert reached_end_of_block
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler is back


def test_a_build_error_after_ctrl_c_becomes_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt), interruptible():
        signal.raise_signal(signal.SIGINT)
        raise RuntimeError("builder returned no engine")  # what a cancelled build looks like


def test_no_ctrl_c_changes_nothing():
    with interruptible() as cancel:
        pass
    assert not cancel.is_set()


@pytest.mark.rtx
def test_monitor_cancels_the_build_once_the_event_is_set():
    import threading

    from gemma4_compile.engines.seam import load_trt

    cancel = threading.Event()
    monitor = make_monitor(load_trt("tensorrt_rtx"), None, "sm89:", cancel)
    monitor.phase_start("Building", None, 3)
    assert monitor.step_complete("Building", 0) is True
    cancel.set()
    assert monitor.step_complete("Building", 1) is False
    monitor.phase_finish("Building")
