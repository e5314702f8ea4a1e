"""The error a reverse mapping raises for content the service cannot take into its records."""

from __future__ import annotations


class UnsupportedContent(ValueError):
    """A resource (or part of it) that has no place in the clinic's records.

    `path` is the FHIRPath of the offending element, so the caller can answer with an
    OperationOutcome that points at it.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
