"""What `gemma4-compile generate` and `serve` do, so the CLI only parses and prints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import BackendUnavailable
from .backend import LOW_MEMORY_PREFILL, open_runner
from .generate import GenerationResult, generate
from .images import media_prompt
from .sampler import GREEDY, SamplingParams
from .tokenizer import TextTokenizer


def generate_text(
    export_dir: str | Path,
    prompt: str,
    write: Callable[[str], None],
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    params: SamplingParams = GREEDY,
    backend: str = "ort",
    provider: str = "cpu",
    threads: int | None = None,
    images: Sequence[str | Path] = (),
    image_budget: int | None = None,
    audio: Sequence[str | Path] = (),
    low_memory: bool = False,
) -> GenerationResult:
    """Generate after `prompt` (a user turn of the chat template with `chat`), writing text as it is made.
    `images`: image files for the prompt's `<|image|>` markers, `audio`: WAV files for its `<|audio|>` ones
    (runtime/images.py, runtime/audio.py). `low_memory`: the edge recipe (backend.open_runner)."""
    tokenizer = TextTokenizer(export_dir)
    runner = open_runner(export_dir, backend, provider, threads, low_memory=low_memory)
    prompt_in = media_prompt(
        runner, tokenizer, prompt, images, chat=chat, budget=image_budget, audio_paths=audio
    )
    ids = prompt_in.ids
    stream = tokenizer.stream()

    def on_token(token: int) -> None:
        if text := stream.push(token):
            write(text)

    result = generate(
        runner,
        ids,
        max_new_tokens,
        params,
        tokenizer.defaults.eos_token_ids,
        on_token,
        image_embeds=prompt_in.image_embeds,
        audio_embeds=prompt_in.audio_embeds,
        prefill_chunk=LOW_MEMORY_PREFILL if low_memory else None,
    )
    if rest := stream.flush():
        write(rest)
    return result


def serve_export(
    export_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    backend: str = "ort",
    provider: str = "cpu",
    threads: int | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    try:
        from .server import serve
    except ImportError as e:
        raise BackendUnavailable(f"serve needs {e.name}: pip install 'gemma4-compile[serve]'") from None
    from .service import Service

    service = Service.open(
        export_dir, max_batch=max_batch, backend=backend, provider=provider, threads=threads
    )
    announce(
        f"serving '{service.model_id}' on http://{host}:{port}/v1 (max batch {max_batch}, max_seq_len "
        f"{service.max_seq_len})"
    )
    try:
        serve(service, host, port)
    finally:
        service.close()
