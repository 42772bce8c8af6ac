"""Every error the zoo raises on purpose. Each one names the thing and the fix."""

from __future__ import annotations


class ZooError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""

    exit_code = 2


class UnknownBackboneError(ZooError, KeyError):
    def __init__(self, name: str, suggestions: list[str] | None = None, hint: str = ""):
        self.name = name
        self.suggestions = suggestions or []
        msg = f"unknown backbone {name!r}"
        if self.suggestions:
            msg += "; did you mean: " + ", ".join(self.suggestions) + "?"
        msg += hint or " (run `zoo list` to see every backbone, `zoo plugins` for broken plugins)"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class AmbiguousBackboneError(ZooError, KeyError):
    def __init__(self, name: str, candidates: list[str]):
        self.candidates = candidates
        super().__init__(
            f"backbone name {name!r} is provided by several plugins: {', '.join(candidates)}; "
            "use the qualified name provider/model"
        )

    def __str__(self) -> str:
        return self.args[0]


class UnknownWeightsError(ZooError, ValueError):
    pass


class WeightsUnavailableError(ZooError, RuntimeError):
    """Pretrained weights could not be had (typically: offline)."""


class PluginError(ZooError, RuntimeError):
    """A plugin failed to load, register, or answer a hook."""


class DuplicateBackboneError(PluginError):
    pass


class InvalidRecordError(PluginError, ValueError):
    """A plugin handed the registry a record that breaks the contract (e.g. std <= 0)."""


class DataError(ZooError, ValueError):
    """The user's data cannot be used as given."""


class ExportValidationError(ZooError, RuntimeError):
    """An exported artifact disagrees with eager PyTorch beyond tolerance."""

    exit_code = 3


class UnknownExporterError(ZooError, KeyError):
    def __str__(self) -> str:
        return self.args[0]


class UnknownEngineError(ZooError, KeyError):
    """An extraction engine name no installed plugin registers (`--engine`)."""

    def __str__(self) -> str:
        return self.args[0]
