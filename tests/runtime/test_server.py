"""The OpenAI-compatible server, driven by the official `openai` client on 127.0.0.1."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest

from gemma4_compile.runtime import TextTokenizer, generate


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def model(server):
    return server[1].model_id


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: " + "tell me more " * (i % 5)}]


def _solo(runner, export_dir, messages, n):
    """What one greedy generation gives alone (the reference for every served answer)."""
    tok = TextTokenizer(export_dir)
    result = generate(runner, tok.encode_chat(messages), n, stop_ids=tok.defaults.eos_token_ids)
    return tok.decode(result.tokens), len(result.tokens), result.finish_reason


def _wait_idle(service, seconds=30):
    deadline = time.monotonic() + seconds
    while service.engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    return service.engine.active == 0


def test_models_and_health(client, server, model):
    assert [m.id for m in client.models.list().data] == [model]
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"


def test_one_request_equals_a_solo_greedy_run(client, model, runner, export_dir):
    reply = client.chat.completions.create(model=model, messages=_chat(1), max_tokens=10, temperature=0)
    text, n, finish = _solo(runner, export_dir, _chat(1), 10)
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == finish
    assert reply.usage.completion_tokens == n
    assert reply.usage.prompt_tokens == len(TextTokenizer(export_dir).encode_chat(_chat(1)))


def test_streamed_request_equals_a_solo_greedy_run(client, model, runner, export_dir):
    stream = client.chat.completions.create(
        model=model, messages=_chat(2), max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    want, _, finish = _solo(runner, export_dir, _chat(2), 10)
    assert text == want and chunks[-1].choices[0].finish_reason == finish
    assert chunks[0].choices[0].delta.role == "assistant"


def test_32_concurrent_clients_each_get_their_solo_tokens(client, model, runner, export_dir, server):
    service = server[1]
    before = len(service.engine.batch_sizes)

    def ask(i):
        r = client.chat.completions.create(model=model, messages=_chat(i), max_tokens=8, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    assert got == [_solo(runner, export_dir, _chat(i), 8) for i in range(32)]
    assert max(service.engine.batch_sizes[before:]) > 1  # the requests really shared decode steps


def test_seeded_sampling_is_reproducible_through_the_api(client, model):
    def ask(seed):
        r = client.chat.completions.create(
            model=model, messages=_chat(3), max_tokens=12, temperature=1.0, top_p=0.95, seed=seed
        )
        return r.choices[0].message.content

    assert ask(4) == ask(4)


def test_bad_requests_get_the_api_error_shape_and_the_server_goes_on(client, model, server):
    url, service = server
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=_chat(0), max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    raw = httpx.post(
        f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    lost = httpx.get(f"{url}/v1/nothing")
    assert lost.status_code == 404 and lost.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError, match="max_seq_len is 256") as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 400}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="exceed the export's max_seq_len"):
        client.chat.completions.create(model=model, messages=_chat(0), max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=_chat(0), temperature=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=model, messages=[])
    ok = client.chat.completions.create(model=model, messages=_chat(0), max_tokens=2, temperature=0)
    assert ok.choices[0].message.content is not None and _wait_idle(service)


def test_client_disconnect_mid_stream_frees_the_row(client, model, server):
    url, service = server
    body = {"model": model, "messages": _chat(5), "max_tokens": 200, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event arrived; now hang up
    assert _wait_idle(service), "the abandoned sequence still holds a row"
    ok = client.chat.completions.create(model=model, messages=_chat(6), max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1
