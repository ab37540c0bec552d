"""The batching engine on its own: rows join and leave between steps, each keeps its caches and its answer."""

from __future__ import annotations

import threading

from gemma4_compile.runtime import SamplingParams, generate
from gemma4_compile.runtime.batching import BatchEngine, Job


class Recording:
    """Delegates to a runner and records, per step, the batch size and every cache's slot count."""

    def __init__(self, runner):
        self.runner, self.manifest, self.steps = runner, runner.manifest, []

    def start(self, batch, max_len):
        return self.runner.start(batch, max_len)

    def step(self, state, ids, seq_len):
        self.steps.append((ids.shape[0], {k: v.shape[2] for k, v in state.caches.items()}))
        return self.runner.step(state, ids, seq_len)


def test_rows_join_and_leave_and_each_gets_its_solo_tokens(runner, run_batched):
    prompts = [list(range(5, 5 + n)) for n in (3, 11, 20, 7, 15)]
    budgets = [9, 4, 12, 6, 10]  # different lengths: rows finish at different steps and free their slots
    recording = Recording(runner)
    out, engine = run_batched(recording, prompts, budgets, max_batch=3, max_len=64)
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        assert out[i] == generate(runner, p, n, max_seq_len=64).tokens, i
    sizes = [b for b, _ in recording.steps]
    assert max(sizes) == 3 and min(sizes) < 3  # full batches, and rows that left
    W = runner.manifest.spec.sliding_window
    for c in runner.manifest.caches:
        want = W if c.kind == "sliding" else 64
        assert all(slots[c.past[0]] == want for _, slots in recording.steps), c.past[0]
    assert engine.active == 0


def test_a_cancelled_job_leaves_and_the_others_go_on(runner):
    engine = BatchEngine(runner, max_batch=4, max_len=64).start()
    finished, tokens = {}, {"a": [], "b": []}
    ended = threading.Event()

    def emit_a(token, finish):
        if token is not None:
            tokens["a"].append(token)
            if len(tokens["a"]) == 2:
                a.cancel()

    def emit_b(token, finish):
        if token is not None:
            tokens["b"].append(token)
        else:
            finished["b"] = finish
            ended.set()

    try:
        a = engine.submit(Job([5, 6, 7], 40, SamplingParams(), frozenset(), emit_a))
        engine.submit(Job([8, 9], 12, SamplingParams(), frozenset(), emit_b))
        assert ended.wait(120)
    finally:
        engine.stop()
    assert finished["b"] == "length" and len(tokens["b"]) == 12
    assert 2 <= len(tokens["a"]) <= 3  # at most the step already running when it was cancelled
    assert tokens["b"] == generate(runner, [8, 9], 12, max_seq_len=64).tokens
    assert engine.active == 0
