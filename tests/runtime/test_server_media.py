"""Images and audio through the chat-completions API (OpenAI content parts: `image_url` with a base64 data URL,
`input_audio` with base64 WAV) on the tiny-e2b vision+audio export: every answer equals a solo greedy run of
the same prompt and soft tokens, media requests batched next to a text one."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from serving import served
from test_audio_prompt import tone, write_pcm16

from gemma4_compile.runtime.audio import AUDIO_MARKER, audio_clips
from gemma4_compile.runtime.images import IMAGE_MARKER, chat_media_prompt, load_image


@pytest.fixture(scope="module")
def media_server(make_vision_export, tmp_path_factory):
    from PIL import Image

    _, out = make_vision_export("tiny-e2b")
    folder = tmp_path_factory.mktemp("served-media")
    for name, size in (("a.png", (40, 60)), ("b.png", (64, 32))):
        pixels = np.random.default_rng(len(name) + size[0]).integers(0, 256, (*size, 3), np.uint8)
        Image.fromarray(pixels).save(folder / name)
    write_pcm16(folder / "a.wav", tone(0.5))
    with served(out, max_batch=4) as (url, service):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)
        yield client, service, folder


def _image_part(path) -> dict:
    url = "data:image/png;base64," + _b64(path.read_bytes())
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}  # 70 soft tokens: tiny towers


def _audio_part(path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": _b64(path.read_bytes()), "format": "wav"}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _solo(service, messages, images, clips, n: int) -> str:
    """Greedy tokens of the same prompt alone, through the runner directly."""
    runner, tok = service.engine.runner, service.tokenizer
    prompt = chat_media_prompt(runner, tok, messages, images, clips, [70] * len(images))
    state = runner.start(1, len(prompt.ids) + n)
    if prompt.image_embeds is not None:
        runner.attach_images(state, prompt.image_embeds)
    if prompt.audio_embeds is not None:
        runner.attach_audio(state, prompt.audio_embeds)
    last = runner.step(state, np.array([prompt.ids]), np.array([len(prompt.ids)]))[0, -1]
    tokens = []
    for _ in range(n):
        tokens.append(int(last.argmax()))
        if tokens[-1] in tok.defaults.eos_token_ids:
            tokens.pop()
            break
        last = runner.step(state, np.array([[tokens[-1]]]), np.array([1]))[0, -1]
    return tok.decode(tokens)


def test_media_requests_batched_with_text_each_get_their_solo_tokens(media_server):
    client, service, folder = media_server
    a, b, wav = folder / "a.png", folder / "b.png", folder / "a.wav"
    requests = [
        ([{"type": "text", "text": "Look: "}, _image_part(a), {"type": "text", "text": " and hear "}, _audio_part(wav)],
         f"Look: {IMAGE_MARKER} and hear {AUDIO_MARKER}", [a], [wav]),
        ([_image_part(b), _image_part(a), {"type": "text", "text": "Which is wider?"}],
         f"{IMAGE_MARKER}{IMAGE_MARKER}Which is wider?", [b, a], []),
        ("Just text, no media.", "Just text, no media.", [], []),
    ]  # fmt: skip

    def ask(content):
        reply = client.chat.completions.create(
            model=service.model_id,
            messages=[{"role": "user", "content": content}],
            max_tokens=6,
            temperature=0,
        )
        return reply.choices[0].message.content, reply.usage.prompt_tokens

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(ask, [r[0] for r in requests]))
    for (_, text, images, clips), (content, prompt_tokens) in zip(requests, replies):
        messages = [{"role": "user", "content": text}]
        decoded = [load_image(p) for p in images]
        features = audio_clips(clips)
        assert content == _solo(service, messages, decoded, features, 6)
        expect = chat_media_prompt(
            service.engine.runner, service.tokenizer, messages, decoded, features, [70] * len(decoded)
        )
        assert prompt_tokens == len(expect.ids)


@pytest.mark.parametrize(
    ("part", "match"),
    [
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "fetches nothing"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "not valid base64"),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(b"not a png")}},
            "not an image",
        ),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "mp3"}}, "input_audio must be"),
        ({"type": "video_url", "video_url": {"url": "x"}}, "unknown part type"),
    ],
)
def test_bad_media_parts_are_400_with_the_part_named(media_server, part, match):
    client, service, _ = media_server
    with pytest.raises(openai.BadRequestError, match=match) as e:
        client.chat.completions.create(
            model=service.model_id, messages=[{"role": "user", "content": [part]}], max_tokens=2
        )
    assert "message 0, part 0" in str(e.value)


def test_an_8_khz_clip_is_refused_before_any_encoder_runs(media_server, tmp_path):
    client, service, _ = media_server
    buf = tmp_path / "8k.wav"
    write_pcm16(buf, tone(0.5), rate=8000)
    with pytest.raises(openai.BadRequestError, match="8000 Hz"):
        client.chat.completions.create(
            model=service.model_id, messages=[{"role": "user", "content": [_audio_part(buf)]}], max_tokens=2
        )
