"""What serving needs from an export, in one object: tokenizer, runner, batching engine and request checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backend import open_runner
from .batching import BatchEngine, Emit, Job
from .errors import ContextLengthExceeded
from .generate import check_budget
from .images import MediaPrompt, chat_media_prompt
from .sampler import SamplingParams
from .tokenizer import TextTokenizer


@dataclass
class Service:
    model_id: str
    tokenizer: TextTokenizer
    engine: BatchEngine
    max_seq_len: int

    @classmethod
    def open(
        cls,
        export_dir: str | Path,
        max_batch: int = 8,
        backend: str = "ort",
        provider: str = "cpu",
        threads: int | None = None,
        model_id: str | None = None,
    ) -> Service:
        tokenizer = TextTokenizer(export_dir)  # first: no tokenizer, no server
        runner = open_runner(export_dir, backend, provider, threads)
        max_seq_len = runner.manifest.max_seq_len
        engine = BatchEngine(runner, max_batch, max_seq_len).start()
        return cls(model_id or Path(export_dir).resolve().name, tokenizer, engine, max_seq_len)

    def close(self) -> None:
        self.engine.stop()

    def default_params(
        self, temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None
    ) -> SamplingParams:
        """A request's sampling; what it leaves out comes from generation_config.json (greedy without one)."""
        d = self.tokenizer.defaults
        if temperature is None:
            temperature = (d.temperature or 1.0) if d.do_sample else 0.0
        return SamplingParams(
            temperature=float(temperature),
            top_k=int(top_k if top_k is not None else d.top_k or 0),
            top_p=float(top_p if top_p is not None else d.top_p or 1.0),
            seed=seed,
        )

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    def prompt(
        self,
        messages: list[dict[str, Any]],
        images: list[Any],
        clips: list[Any],
        budgets: list[int | None] | None = None,
    ) -> MediaPrompt:
        """A conversation's ids and, with images or audio clips (marked in the message texts), their soft
        tokens from the export's encoders (checked before they run); `budgets`: soft tokens per image."""
        if not images and not clips:
            return MediaPrompt(self.prompt_ids(messages), None)
        return chat_media_prompt(self.engine.runner, self.tokenizer, messages, images, clips, budgets)

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """max new tokens for a request: as asked, or what fits; raises when the prompt or the ask is too long."""
        if prompt_tokens >= self.max_seq_len:
            raise ContextLengthExceeded(
                f"the prompt has {prompt_tokens} tokens; this export's max_seq_len is {self.max_seq_len}"
            )
        n = self.max_seq_len - prompt_tokens if max_tokens is None else max_tokens
        check_budget(prompt_tokens, n, self.max_seq_len)
        return n

    def submit(self, prompt: MediaPrompt, max_new_tokens: int, params: SamplingParams, emit: Emit) -> Job:
        stops = frozenset(self.tokenizer.defaults.eos_token_ids)
        job = Job(prompt.ids, max_new_tokens, params, stops, emit, prompt.image_embeds, prompt.audio_embeds)
        return self.engine.submit(job)
