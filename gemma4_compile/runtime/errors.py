"""The runtime's error type (a one-line message; the CLI and the server turn it into their error shapes)."""

from __future__ import annotations

from ..errors import Gemma4CompileError


class RuntimeInputError(Gemma4CompileError):
    """A request or an export cannot be run as given (no tokenizer, a prompt too long, a bad message)."""


class ContextLengthExceeded(RuntimeInputError):
    """The prompt, or the prompt and the tokens asked for, do not fit the export's max_seq_len."""
