"""The project's one root error type and its few specialisations."""

from __future__ import annotations

from dataclasses import dataclass


class SluiceError(Exception):
    """Root of every error Sluice raises on purpose; the CLI prints these without a traceback."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located by its dotted path (``services.llm.runtime.batch_size``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(SluiceError):
    """A config file is invalid; carries every issue found, not just the first."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  - {issue}" for issue in issues)
        noun = "error" if len(issues) == 1 else "errors"
        super().__init__(f"{source}: {len(issues)} {noun}\n{lines}")


class CompileError(SluiceError):
    """The config is valid but the repository could not be produced (export failed, foreign directory, ...)."""
