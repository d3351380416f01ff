"""Errors that reach the user as one line (the CLI prints them and exits with code 2)."""


class TorchslimError(Exception):
    """Base class: the message is complete and user-facing; no traceback is shown for it."""


class ConfigError(TorchslimError, ValueError):
    """A configuration value is invalid. The message names the field and the fix."""


class TaskError(TorchslimError):
    """A task spec cannot be loaded or a model does not fit the task."""


class WeightsError(TorchslimError):
    """A weights file is missing, unsafe (pickled code) or does not match the model."""


class ExportError(TorchslimError):
    """The model cannot be exported to ONNX (the message names the unsupported op)."""


def check(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError('field: message') unless condition holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
