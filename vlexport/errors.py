"""Typed errors. The CLI maps them to exit codes: 2 for usage, 1 for a failed check."""

from __future__ import annotations

from typing import Any


class VlexportError(Exception):
    """Base class: a message written for the user, one paragraph, saying what to do."""

    exit_code = 1


class UsageError(VlexportError):
    """Bad input: unknown preset, unsupported task, missing weights, existing output dir, ..."""

    exit_code = 2


class CheckError(VlexportError):
    """A check failed: validation mismatch, corrupt file, missing component."""

    exit_code = 1


class ValidationError(CheckError):
    """An artifact's outputs differ from the eager reference beyond tolerance (carries the report)."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report  # manifest.ValidationReport
