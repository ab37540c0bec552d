"""An OpenAI-compatible chat-completions server (starlette + uvicorn) over the batching engine.

Routes: POST /v1/chat/completions (JSON, or SSE with `"stream": true`), GET /v1/models, GET /health.
Message content may hold images (`image_url` parts with base64 data: URLs) and audio (`input_audio` parts,
base64 WAV, 16 kHz mono) on exports with those encoders; each is decoded and checked before anything runs.
Errors use the API's shape, `{"error": {"message", "type", "param", "code"}}`, with its status codes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import Gemma4CompileError
from .audio import AUDIO_MARKER, clip_features, wav_samples
from .errors import ContextLengthExceeded, RuntimeInputError
from .images import IMAGE_MARKER, MediaPrompt, decode_image
from .sampler import SamplingParams
from .service import Service


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type_

    def response(self) -> JSONResponse:
        body = {"message": str(self), "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # contents as text, with a marker where each image / audio part was
    stream: bool
    max_tokens: int | None
    params: SamplingParams
    images: list[Any] = field(default_factory=list)  # decoded Pillow images, in order
    budgets: list[int | None] = field(default_factory=list)  # per image: soft tokens from its "detail"
    clips: list[Any] = field(default_factory=list)  # log-mel features of the audio parts, in order


PARTS = "a string or a list of text, image_url (data: URL) and input_audio (wav) parts"


# image_url "detail": the processor's soft-token budget per image ("auto": the export's default, 280 for Gemma 4)
DETAIL_BUDGETS = {"low": 70, "high": 1120, "auto": None}


def _content(content: Any, where: str, images: list[Any], budgets: list[int | None], clips: list[Any]) -> str:
    """Message content as text; image and audio parts are decoded into `images` / `clips` and leave their
    marker in the text (this server fetches nothing: images come as base64 data URLs)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise ApiError(400, f"{where}: content must be {PARTS}", param="messages")
    text = []
    for j, part in enumerate(content):
        kind, name = part.get("type"), f"{where}, part {j}"
        try:
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind == "image_url":
                images.append(decode_image(_data_url(part.get("image_url"), name), name))
                budgets.append(_detail(part.get("image_url"), name))
                text.append(IMAGE_MARKER)
            elif kind == "input_audio":
                clips.append(
                    clip_features(wav_samples(_audio_data(part.get("input_audio"), name), name), name)
                )
                text.append(AUDIO_MARKER)
            else:
                raise ApiError(
                    400, f"{name}: unknown part type {kind!r}; content must be {PARTS}", param="messages"
                )
        except RuntimeInputError as e:
            raise ApiError(400, str(e), param="messages") from None
    return "".join(text)


def _data_url(value: Any, name: str) -> bytes:
    """The bytes of an image_url part: {"url": "data:image/...;base64,..."} or the URL itself."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError(
            400,
            f"{name}: image_url must be a base64 data: URL (this server fetches nothing)",
            param="messages",
        )
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        raise ApiError(
            400, f"{name}: image_url data must be base64 (data:image/png;base64,...)", param="messages"
        )
    return _b64(payload, name)


def _detail(value: Any, name: str) -> int | None:
    detail = value.get("detail", "auto") if isinstance(value, dict) else "auto"
    if detail not in DETAIL_BUDGETS:
        raise ApiError(400, f"{name}: detail must be one of {', '.join(DETAIL_BUDGETS)}", param="messages")
    return DETAIL_BUDGETS[detail]


def _audio_data(value: Any, name: str) -> bytes:
    if not isinstance(value, dict) or value.get("format") != "wav" or not isinstance(value.get("data"), str):
        raise ApiError(
            400, f"{name}: input_audio must be {{'data': base64 WAV, 'format': 'wav'}}", param="messages"
        )
    return _b64(value["data"], name)


def _b64(payload: str, name: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name}: the data is not valid base64", param="messages") from None


def _optional(body: dict, name: str, kind: type, lo: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise ApiError(400, f"'{name}' must be {kind.__name__}, got {value!r}", param=name)
    if lo is not None and value < lo:
        raise ApiError(400, f"'{name}' must be >= {lo}, got {value!r}", param=name)
    return value


def parse_chat_request(body: Any, service: Service) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") != service.model_id:
        raise ApiError(
            404,
            f"the model '{body.get('model')}' does not exist; this server has '{service.model_id}'",
            param="model",
            code="model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of message objects", param="messages")
    if _optional(body, "n", int, 1) not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = _optional(body, "max_completion_tokens", int, 1) or _optional(body, "max_tokens", int, 1)
    try:
        params = service.default_params(
            _optional(body, "temperature", float, 0),
            _optional(body, "top_k", int, 0),
            _optional(body, "top_p", float, 0),
            _optional(body, "seed", int),
        )
    except Gemma4CompileError as e:
        raise ApiError(400, str(e)) from None
    images: list[Any] = []
    budgets: list[int | None] = []
    clips: list[Any] = []
    msgs = [
        {
            "role": str(m.get("role")),
            "content": _content(m.get("content", ""), f"message {i}", images, budgets, clips),
        }
        for i, m in enumerate(messages)
    ]
    return ChatRequest(msgs, bool(body.get("stream", False)), max_tokens, params, images, budgets, clips)


class Completion:
    """One request's token stream, bridged from the engine thread into the event loop."""

    def __init__(self, service: Service, prompt: MediaPrompt, max_new_tokens: int, params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        self.service, self.prompt_tokens = service, len(prompt.ids)
        self.completion_tokens = 0
        self.decoder = service.tokenizer.stream()
        emit = lambda token, finish: loop.call_soon_threadsafe(self.events.put_nowait, (token, finish))  # noqa: E731
        self.job = service.submit(prompt, max_new_tokens, params, emit)

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish_reason or None) until the end; text pieces are complete UTF-8."""
        try:
            while True:
                token, finish = await self.events.get()
                if finish is not None:
                    if finish.startswith("error"):
                        raise ApiError(500, f"generation failed ({finish})", type_="server_error")
                    yield self.decoder.flush(), finish
                    return
                self.completion_tokens += 1
                if text := self.decoder.push(token):
                    yield text, None
        finally:
            self.job.cancel()  # a no-op when finished; frees the row when the client went away

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


def create_app(service: Service) -> Starlette:
    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "model": service.model_id, "active": service.engine.active})

    async def models(_: Request) -> Response:
        card = {"id": service.model_id, "object": "model", "created": 0, "owned_by": "gemma4-compile"}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat(request: Request) -> Response:
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON ({e})") from None
            req = parse_chat_request(body, service)
            try:  # the encoders run off the event loop
                prompt = await asyncio.to_thread(
                    service.prompt, req.messages, req.images, req.clips, req.budgets
                )
                budget = service.budget(len(prompt.ids), req.max_tokens)
            except ContextLengthExceeded as e:
                raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
            except Gemma4CompileError as e:
                raise ApiError(400, str(e), param="messages") from None
            completion = Completion(service, prompt, budget, req.params)
            meta = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": service.model_id,
            }
            if req.stream:
                return StreamingResponse(_sse(completion, meta), media_type="text/event-stream")
            text, finish = [], None
            async for piece, finish in completion.pieces():  # noqa: B007
                text.append(piece)
            message = {"role": "assistant", "content": "".join(text)}
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            return JSONResponse(
                {**meta, "object": "chat.completion", "choices": [choice], "usage": completion.usage()}
            )
        except ApiError as e:
            return e.response()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ApiError(
        exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
    ).response()


async def _internal_error(_: Request, exc: Exception) -> Response:
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").response()


async def _sse(completion: Completion, meta: dict[str, Any]) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [choice], **extra})}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for text, finish in completion.pieces():
            yield chunk(
                {"content": text} if text else {}, finish, **({"usage": completion.usage()} if finish else {})
            )
    except ApiError as e:  # headers are gone: the error travels as an event, as OpenAI's API does
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': e.type, 'param': None, 'code': None}})}\n\n"
    yield "data: [DONE]\n\n"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), so a caller learns the port before the server starts."""
    sock = socket.create_server((host, port), reuse_port=False)
    sock.set_inheritable(True)
    return sock


def make_server(service: Service, log_level: str = "warning") -> Any:
    """A uvicorn.Server for the app; `.run(sockets=[bind(...)])` serves until `.should_exit` is set."""
    import uvicorn

    return uvicorn.Server(
        uvicorn.Config(create_app(service), log_level=log_level, timeout_graceful_shutdown=2)
    )


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted."""
    make_server(service, log_level).run(sockets=[bind(host, port)])
