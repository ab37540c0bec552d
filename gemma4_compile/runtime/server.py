"""An OpenAI-compatible chat-completions server (starlette + uvicorn) over the batching engine.

Routes: POST /v1/chat/completions (JSON, or SSE with `"stream": true`), GET /v1/models, GET /health.
Errors use the API's shape, `{"error": {"message", "type", "param", "code"}}`, with its status codes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import Gemma4CompileError
from .errors import ContextLengthExceeded
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
    messages: list[dict[str, Any]]
    stream: bool
    max_tokens: int | None
    params: SamplingParams


def _text_content(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of parts (no images yet)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, "message content must be a string or a list of text parts", param="messages")


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
    msgs = [{"role": str(m.get("role")), "content": _text_content(m.get("content", ""))} for m in messages]
    return ChatRequest(msgs, bool(body.get("stream", False)), max_tokens, params)


class Completion:
    """One request's token stream, bridged from the engine thread into the event loop."""

    def __init__(self, service: Service, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        self.service, self.prompt_tokens = service, len(prompt_ids)
        self.completion_tokens = 0
        self.decoder = service.tokenizer.stream()
        emit = lambda token, finish: loop.call_soon_threadsafe(self.events.put_nowait, (token, finish))  # noqa: E731
        self.job = service.submit(prompt_ids, max_new_tokens, params, emit)

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
            try:
                prompt = service.prompt_ids(req.messages)
                budget = service.budget(len(prompt), req.max_tokens)
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
