"""One error type per stage, and the one table of exit codes.

The CLI turns any `Gemma4CompileError` into a one-line message on stderr and its `exit_code`.
"""

# Exit codes of `gemma4-compile`, one per meaning (documented in the README, "Exit codes").
EXIT_OK = 0
EXIT_ERROR = 1  # bad input or a stage that could not run: the one-line message says which
EXIT_VALIDATION_FAILED = 2  # the run completed and a backend disagrees with the reference
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); outputs are left as they were before the run

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "error: bad input, a refused output path, or a stage that could not run",
    EXIT_VALIDATION_FAILED: "validation failed: a backend disagrees with the reference beyond tolerance",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); previous outputs untouched",
}


class Gemma4CompileError(Exception):
    """Base class: an expected failure with a message fit for a user."""

    exit_code = EXIT_ERROR


class UsageError(Gemma4CompileError):
    """The command line asks for something impossible (a missing argument, an unreadable size, a refused output)."""


class SpecError(Gemma4CompileError):
    """A config.json value is missing, of the wrong type or inconsistent."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config field '{field}': {message}")
        self.field = field


class CheckpointError(Gemma4CompileError):
    """A checkpoint directory, file or tensor is missing, truncated or mis-shaped."""


class ExportError(Gemma4CompileError):
    """The ONNX export could not be produced."""


class BuildError(Gemma4CompileError):
    """A TensorRT engine could not be built, or the installed TensorRT cannot build the target."""


class ValidateError(Gemma4CompileError):
    """Validation or benchmarking could not run: bad prompts, steps, backend or reference, or inputs that do
    not fit the export. (A run that completes and disagrees is `ValidationFailed`.)"""


class RunnerError(Gemma4CompileError):
    """A runner (runners/: onnxruntime, TensorRT; validate/reference.py: torch, transformers) refused a step's
    inputs or could not run it."""


class ValidationFailed(Gemma4CompileError):
    """A backend disagrees with the reference beyond the stated tolerance."""

    exit_code = EXIT_VALIDATION_FAILED


class BackendUnavailable(Gemma4CompileError):
    """A backend needs a module or device this machine does not have."""
