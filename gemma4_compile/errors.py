"""One error type per stage; the CLI turns any of them into a one-line message and a non-zero exit."""


class Gemma4CompileError(Exception):
    """Base class: an expected failure with a message fit for a user."""

    exit_code = 1


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


class ValidationFailed(Gemma4CompileError):
    """A backend disagrees with the reference beyond the stated tolerance."""

    exit_code = 2


class BackendUnavailable(Gemma4CompileError):
    """A backend needs a module or device this machine does not have."""
