"""Domain errors raised by the core, and how a field path is written.

    ServiceError
     ├── InvalidRecord        422: the record breaks a rule; each problem names its field path
     ├── RecordNotFound       404: no record of that kind and external id
     └── VersionConflict      412: If-Match named a version that is no longer current

The intake API turns these into RFC 9457 problem documents; the FHIR facade (later) into
OperationOutcomes. Core code raises them and never builds HTTP responses itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

Loc = tuple[str | int, ...]


def dotted(loc: Loc) -> str:
    """`("vitals", 0, "systolic")` as `vitals[0].systolic`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def json_pointer(loc: Loc) -> str:
    """`("vitals", 0, "systolic")` as the RFC 6901 pointer `/vitals/0/systolic`."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in loc)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a record, at a field path."""

    loc: Loc
    type: str
    message: str

    def as_json(self) -> dict[str, object]:
        return {
            "path": dotted(self.loc),
            "pointer": json_pointer(self.loc),
            "loc": list(self.loc),
            "type": self.type,
            "message": self.message,
        }


class ServiceError(Exception):
    """Base of the errors the core raises on purpose."""

    status = 500
    title = "Service error"


@dataclass
class InvalidRecord(ServiceError):
    problems: Sequence[Problem] = field(default_factory=list)

    status = 422
    title = "Invalid record"

    def __str__(self) -> str:
        return "; ".join(f"{dotted(p.loc) or '(record)'}: {p.message}" for p in self.problems)


@dataclass
class RecordNotFound(ServiceError):
    kind: str
    external_id: str

    status = 404
    title = "Record not found"

    def __str__(self) -> str:
        return f"no {self.kind} with external_id {self.external_id}"


@dataclass
class VersionConflict(ServiceError):
    kind: str
    external_id: str
    expected: str
    current: int | None

    status = 412
    title = "Version conflict"

    def __str__(self) -> str:
        current = "it does not exist" if self.current is None else f"it is at {self.current}"
        return (
            f"{self.kind} {self.external_id}: If-Match asked for version {self.expected}, "
            f"but {current}"
        )
