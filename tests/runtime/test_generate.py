"""Sampling against a numpy reference and transformers' logits warpers; generation against BaseRunner.generate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gemma4_compile.cli import main
from gemma4_compile.export.bundle import RUNTIME_FILES
from gemma4_compile.runtime import Sampler, SamplingParams, TextTokenizer, filtered_probs, generate
from gemma4_compile.runtime.backend import LOW_MEMORY_PREFILL, open_runner
from gemma4_compile.runtime.commands import generate_text

LOGITS = np.random.default_rng(7).normal(0, 2, 64).astype(np.float32)
CASES = [
    SamplingParams(1.0),
    SamplingParams(0.7),
    SamplingParams(1.3, top_k=5),
    SamplingParams(1.0, top_p=0.8),
    SamplingParams(0.5, top_k=10, top_p=0.6),
    SamplingParams(2.0, top_k=1),
]


def reference_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Spelled out: softmax(logits / T) over the top-k, then the shortest most-likely prefix reaching top_p."""
    z = logits.astype(np.float64) / p.temperature
    order = sorted(range(z.size), key=lambda i: -z[i])
    allowed = order[: p.top_k] if p.top_k else order
    w = {i: np.exp(z[i] - z[order[0]]) for i in allowed}
    total = sum(w.values())
    kept, mass = [], 0.0
    for i in allowed:
        if mass >= p.top_p:
            break
        kept.append(i)
        mass += w[i] / total
    out = np.zeros(z.size)
    out[kept] = [w[i] for i in kept]
    return out / out.sum()


def transformers_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    scores = torch.from_numpy(logits.astype(np.float64))[None]
    warpers = [TemperatureLogitsWarper(p.temperature)]
    warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
    warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize("params", CASES, ids=str)
def test_filtered_probs_match_the_references(params):
    got = filtered_probs(LOGITS, params)
    np.testing.assert_allclose(got, reference_probs(LOGITS, params), atol=1e-12)
    np.testing.assert_allclose(got, transformers_probs(LOGITS, params), atol=1e-9)


def test_draws_follow_the_filtered_distribution():
    params = SamplingParams(0.8, top_k=8, top_p=0.9, seed=0)
    sampler, probs = Sampler(params), filtered_probs(LOGITS, params)
    n = 20_000
    counts = np.bincount([sampler(LOGITS) for _ in range(n)], minlength=LOGITS.size) / n
    assert counts[probs == 0].sum() == 0
    np.testing.assert_allclose(counts, probs, atol=4 * np.sqrt(0.25 / n))  # 4 sigma of a binomial frequency


def test_greedy_is_argmax_and_a_seed_reproduces():
    assert Sampler(SamplingParams())(LOGITS) == int(LOGITS.argmax())

    def draws(seed):
        sampler = Sampler(SamplingParams(1.5, seed=seed))
        return [sampler(LOGITS) for _ in range(30)]

    assert draws(11) == draws(11) and draws(11) != draws(12)


def test_greedy_generation_equals_the_runners_generate(runner, export_dir):
    ids = TextTokenizer(export_dir).encode("The quick brown fox")
    want = runner.generate(np.array([ids]), 12)[0].tolist()
    seen: list[int] = []
    got = generate(runner, ids, 12, on_token=seen.append)
    assert got.tokens == seen == want and got.finish_reason == "length" and got.prompt_tokens == len(ids)
    stop = want[5]  # an end id ends it before that token
    cut = generate(runner, ids, 12, stop_ids=[stop])
    assert cut.tokens == want[: want.index(stop)] and cut.finish_reason == "stop"


def test_chunked_prefill_and_the_low_memory_runner_give_the_same_tokens(runner, export_dir):
    """The edge recipe (`generate --low-memory`) prefills a prompt longer than the window in chunks through an
    arena-less session: same greedy tokens as one call."""
    ids = TextTokenizer(export_dir).encode("The quick brown fox jumps over the lazy dog. " * 6)
    assert len(ids) > 2 * runner.spec.sliding_window
    want = generate(runner, ids, 8).tokens
    assert generate(runner, ids, 8, prefill_chunk=5).tokens == want
    low = open_runner(export_dir, threads=1, low_memory=True)
    assert generate(low, ids, 8, prefill_chunk=LOW_MEMORY_PREFILL).tokens == want


def test_seeded_sampling_generation_is_reproducible(runner, export_dir):
    ids = TextTokenizer(export_dir).encode("Hello")
    run = lambda seed: generate(runner, ids, 16, SamplingParams(1.0, top_k=50, seed=seed)).tokens  # noqa: E731
    assert run(5) == run(5) and run(5) != run(6)


def test_cli_generate_streams_and_reports_speed(export_dir, capsys, runner):
    tok = TextTokenizer(export_dir)
    assert (
        main(["generate", str(export_dir), "--prompt", "The quick brown fox", "--max-new-tokens", "8"]) == 0
    )
    out, err = capsys.readouterr()
    want = tok.decode(runner.generate(np.array([tok.encode("The quick brown fox")]), 8)[0].tolist())
    assert out == want + "\n"
    assert "tokens/s" in err and "time to first token" in err


def test_an_export_runs_without_its_checkpoint(export_dir, tmp_path, runner):
    moved = tmp_path / "moved"
    shutil.copytree(export_dir, moved)
    manifest = json.loads((moved / "export.json").read_text())
    manifest["checkpoint"] = str(tmp_path / "gone")  # the source checkpoint is nowhere to be found
    (moved / "export.json").write_text(json.dumps(manifest))
    writes: list[str] = []
    got = generate_text(moved, "Hello", writes.append, chat=True, max_new_tokens=6)
    tok = TextTokenizer(export_dir)
    want = generate(runner, tok.encode_chat([{"role": "user", "content": "Hello"}]), 6, stop_ids=(1, 106))
    assert got.tokens == want.tokens and "".join(writes) == tok.decode(want.tokens)


def test_cli_generate_errors_are_one_line(export_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(export_dir, bare, ignore=shutil.ignore_patterns(*RUNTIME_FILES))
    assert main(["generate", str(bare), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert "has no tokenizer" in err and len(err.splitlines()) == 1
    assert main(["serve", str(bare), "--port", "0"]) == 1
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["generate", str(export_dir), "--prompt", "hi", "--max-new-tokens", "1000"]) == 1
    assert "exceed the export's max_seq_len 256" in capsys.readouterr().err
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert main(["generate", str(export_dir), "--prompt", "hi", "--provider", "cuda"]) == 1
        assert "gemma4-compile[gpu]" in capsys.readouterr().err
