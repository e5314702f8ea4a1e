"""Record intake: parse, check references, and upsert records idempotently with their history.

A write is keyed by (kind, external_id). Re-sending a record whose canonical content is unchanged
writes nothing; a changed record becomes a new version with a `record_changes` row (who, when,
request id, JSON Patch from the previous version), in the caller's unit of work.

Checks that need other records or the clock live here: dates are not in the future, references
resolve, a course's diagnosis belongs to the
same patient, a prescriber may prescribe, a session falls within its course, and a record never
moves to another patient.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import jsonpatch
import orjson
from pydantic import ValidationError

from service.errors import InvalidRecord, Loc, Problem, RecordNotFound, VersionConflict
from service.records.models import (
    PRESCRIBING_ROLES,
    RECORD_TYPES,
    Assessment,
    Clinician,
    Diagnosis,
    FieldError,
    InfusionSession,
    Patient,
    RecordModel,
    TreatmentCourse,
)
from service.records.repository import (
    RecordChange,
    RecordRepository,
    RecordVersion,
    StoredRecord,
)
from service.security.audit import audit_record_writes
from service.store.db import Database, UnitOfWork

if TYPE_CHECKING:  # the materializer maps records; importing it here would load every mapping
    from service.records.materialize import Materializer

KIND_ORDER = {kind: rank for rank, kind in enumerate(RECORD_TYPES)}


class Outcome(StrEnum):
    created = "created"
    updated = "updated"
    unchanged = "unchanged"


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one upsert did, and the record as now stored."""

    outcome: Outcome
    stored: StoredRecord
    previous: StoredRecord | None = None
    """The version this write replaced, if any."""


# --- parsing ---------------------------------------------------------------------------------


def problems_from(error: ValidationError, prefix: Loc = ()) -> list[Problem]:
    """Pydantic errors as field-path problems; a FieldError's own path extends the location."""
    problems = []
    for item in error.errors(include_url=False):
        loc: Loc = prefix + tuple(item["loc"])
        kind, message = item["type"], item["msg"]
        raised = (item.get("ctx") or {}).get("error")
        if isinstance(raised, FieldError):
            loc += tuple(int(p) if p.isdigit() else p for p in raised.path.split(".") if p)
            kind, message = raised.kind, raised.message
        problems.append(Problem(loc=loc, type=kind, message=message))
    return problems


def parse_record(
    data: object, *, kind: str | None = None, external_id: str | None = None
) -> RecordModel:
    """A validated record from decoded JSON.

    `kind` and `external_id` come from the URL of a PUT: the body may leave them out, and must
    agree with them when it does not.
    """
    if not isinstance(data, dict):
        raise InvalidRecord([Problem((), "type", "a record is a JSON object")])
    body: dict[str, Any] = dict(data)
    for name, expected in (("kind", kind), ("external_id", external_id)):
        if expected is None:
            continue
        given = body.setdefault(name, expected)
        if given != expected:
            raise InvalidRecord(
                [Problem((name,), "mismatch", f"{given!r} does not match the URL's {expected!r}")]
            )
    record_kind = body.get("kind")
    if not isinstance(record_kind, str) or record_kind not in RECORD_TYPES:
        known = ", ".join(RECORD_TYPES)
        problem = (
            Problem(("kind",), "missing", f"every record needs a kind: one of {known}")
            if record_kind is None
            else Problem(("kind",), "enum", f"{record_kind!r} is not a record kind ({known})")
        )
        raise InvalidRecord([problem])
    try:
        return RECORD_TYPES[record_kind].model_validate(body)
    except ValidationError as error:
        raise InvalidRecord(problems_from(error)) from None


def canonical_json(record: RecordModel) -> str:
    """The stored form: every field with its value, absent optionals left out."""
    return orjson.dumps(record.model_dump(mode="json", exclude_none=True)).decode()


def load(stored: StoredRecord) -> RecordModel:
    """A stored record as its model (stored bodies were validated when written)."""
    return RECORD_TYPES[stored.kind].model_validate_json(stored.body)


# --- references ------------------------------------------------------------------------------

Lookup = Callable[[str, str], RecordModel | None]
"""Finds a record by (kind, external_id), or None."""


def check_references(record: RecordModel, lookup: Lookup) -> list[Problem]:
    """Problems with what `record` refers to: missing records and cross-record rules."""
    problems: list[Problem] = []

    def resolve(kind: str, external_id: str | None, loc: Loc) -> RecordModel | None:
        if external_id is None:
            return None
        target = lookup(kind, external_id)
        if target is None:
            problems.append(
                Problem(loc, "unresolved_reference", f"no {kind} with external_id {external_id}")
            )
        return target

    def may_prescribe(clinician: RecordModel | None, loc: Loc, what: str) -> None:
        if isinstance(clinician, Clinician) and clinician.role not in PRESCRIBING_ROLES:
            problems.append(
                Problem(loc, "role", f"{clinician.external_id} is a {clinician.role}; {what}")
            )

    match record:
        case Diagnosis():
            resolve("patient", record.patient, ("patient",))
        case TreatmentCourse():
            resolve("patient", record.patient, ("patient",))
            diagnosis = resolve("diagnosis", record.diagnosis, ("diagnosis",))
            if isinstance(diagnosis, Diagnosis) and diagnosis.patient != record.patient:
                problems.append(
                    Problem(
                        ("diagnosis",),
                        "other_patient",
                        f"diagnosis {diagnosis.external_id} belongs to patient "
                        f"{diagnosis.patient}, not {record.patient}",
                    )
                )
            prescriber = resolve("clinician", record.prescriber, ("prescriber",))
            may_prescribe(prescriber, ("prescriber",), "a course needs a prescriber")
        case InfusionSession():
            course = resolve("course", record.course, ("course",))
            if (
                isinstance(course, TreatmentCourse)
                and record.scheduled_start.date() < course.start_date
            ):
                problems.append(
                    Problem(
                        ("scheduled_start",),
                        "before_course",
                        f"the session is before course {course.external_id} starts "
                        f"({course.start_date})",
                    )
                )
            resolve("clinician", record.administered_by, ("administered_by",))
            supervisor = resolve("clinician", record.supervised_by, ("supervised_by",))
            may_prescribe(supervisor, ("supervised_by",), "an infusion needs a licensed supervisor")
        case Assessment():
            resolve("patient", record.patient, ("patient",))
            course = resolve("course", record.course, ("course",))
            if isinstance(course, TreatmentCourse) and course.patient != record.patient:
                problems.append(
                    Problem(
                        ("course",),
                        "other_patient",
                        f"course {course.external_id} belongs to patient {course.patient}, "
                        f"not {record.patient}",
                    )
                )
        case Patient() | Clinician():
            pass
    return problems


FUTURE_TOLERANCE = timedelta(days=1)
"""How far ahead of the server's clock a record's own date may be: time zones and clock skew."""


def check_dates(record: RecordModel, now: datetime) -> list[Problem]:
    """Things that cannot have happened yet: births, diagnoses, standalone scores in the future.

    Kept out of the models, which stay pure; the clock is the caller's.
    """
    latest = now + FUTURE_TOLERANCE
    dated: list[tuple[str, date | datetime]] = []
    match record:
        case Patient():
            dated.append(("birth_date", record.birth_date))
        case Diagnosis():
            dated.append(("recorded_on", record.recorded_on))
        case Assessment():
            dated.append(("administered_at", record.administered_at))
        case _:
            pass
    problems = []
    for name, value in dated:
        too_late = value > latest if isinstance(value, datetime) else value > latest.date()
        if too_late:
            problems.append(Problem((name,), "date_in_future", f"{name} is in the future"))
    return problems


def _owners(record: RecordModel, lookup: Lookup) -> tuple[str | None, str | None]:
    """(patient external id, course external id) a record is filed under."""
    match record:
        case Patient():
            return record.external_id, None
        case Diagnosis() | Assessment():
            return record.patient, getattr(record, "course", None)
        case TreatmentCourse():
            return record.patient, record.external_id
        case InfusionSession():
            course = lookup("course", record.course)
            return (course.patient if isinstance(course, TreatmentCourse) else None), record.course
        case Clinician():
            return None, None


# --- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedWrite:
    """What writing a record will do, decided from its current stored version."""

    outcome: Outcome
    stored: StoredRecord
    change: RecordChange | None


def plan_write(
    *,
    record: RecordModel,
    current: StoredRecord | None,
    lookup: Lookup,
    actor: str,
    request_id: str | None,
    now: datetime,
    if_match: str | None = None,
) -> PlannedWrite:
    """Decide an upsert: create, a new version, or nothing when the content is the same.

    Raises InvalidRecord (a broken reference or rule) or VersionConflict (`if_match` is stale).
    """
    problems = check_dates(record, now) + check_references(record, lookup)
    if problems:
        raise InvalidRecord(problems)
    key = (record.kind, record.external_id)
    if if_match is not None and (current is None or str(current.version) != if_match):
        raise VersionConflict(
            *key, expected=if_match, current=None if current is None else current.version
        )
    body = canonical_json(record)
    content_hash = hashlib.sha256(body.encode()).hexdigest()
    patient_id, course_id = _owners(record, lookup)
    if current is None:
        stored = StoredRecord(*key, patient_id, course_id, 1, content_hash, body, now, now, actor)
        return PlannedWrite(Outcome.created, stored, _change(stored, None, request_id))
    if current.content_hash == content_hash:
        return PlannedWrite(Outcome.unchanged, current, None)
    if current.patient_id is not None and current.patient_id != patient_id:
        field_name = "course" if record.kind == "session" else "patient"
        raise InvalidRecord(
            [
                Problem(
                    (field_name,),
                    "patient_change",
                    f"{record.kind} {record.external_id} belongs to patient "
                    f"{current.patient_id}; a record cannot move to another patient",
                )
            ]
        )
    patch = jsonpatch.make_patch(orjson.loads(current.body), orjson.loads(body)).to_string()
    stored = StoredRecord(
        *key,
        patient_id,
        course_id,
        current.version + 1,
        content_hash,
        body,
        current.created_at,
        now,
        actor,
    )
    return PlannedWrite(Outcome.updated, stored, _change(stored, patch, request_id))


def write_record(
    *,
    repository: RecordRepository,
    record: RecordModel,
    lookup: Lookup,
    actor: str,
    request_id: str | None = None,
    if_match: str | None = None,
    now: datetime | None = None,
) -> WriteResult:
    """Upsert one record on the repository's connection (the caller commits)."""
    timestamp = now or datetime.now(UTC)
    while True:
        current = repository.get(record.kind, record.external_id, for_update=True)
        plan = plan_write(
            record=record,
            current=current,
            lookup=lookup,
            actor=actor,
            request_id=request_id,
            now=timestamp,
            if_match=if_match,
        )
        if plan.outcome is Outcome.created and not repository.insert(plan.stored):
            continue  # another writer created it between our read and insert: update it
        if plan.outcome is Outcome.updated:
            repository.replace(plan.stored)
        if plan.change is not None:
            repository.add_change(plan.change)
        return WriteResult(plan.outcome, plan.stored, current)


def _change(stored: StoredRecord, patch: str | None, request_id: str | None) -> RecordChange:
    return RecordChange(
        sequence=0,  # assigned by the database
        kind=stored.kind,
        external_id=stored.external_id,
        version=stored.version,
        operation="create" if stored.version == 1 else "update",
        changed_at=stored.updated_at,
        changed_by=stored.updated_by,
        request_id=request_id,
        patch=patch,
        body=stored.body,
    )


def repository_lookup(repository: RecordRepository) -> Lookup:
    def lookup(kind: str, external_id: str) -> RecordModel | None:
        stored = repository.get(kind, external_id)
        return None if stored is None else load(stored)

    return lookup


def put_record(
    *,
    uow: UnitOfWork,
    record: RecordModel,
    materializer: Materializer,
    actor: str,
    request_id: str | None = None,
    if_match: str | None = None,
) -> WriteResult:
    """Upsert one record and its FHIR resources in one transaction, committed before returning."""
    repository = RecordRepository(uow.connection)
    result = write_record(
        repository=repository,
        record=record,
        lookup=repository_lookup(repository),
        actor=actor,
        request_id=request_id,
        if_match=if_match,
    )
    if result.outcome is not Outcome.unchanged:
        materializer.apply(
            uow.connection,
            [RecordVersion(record, result.stored, result.previous)],
            now=result.stored.updated_at,
        )
        keys = [(record.kind, record.external_id)]
        audit_record_writes(uow.connection, keys, subtype="intake", actor=actor)
    uow.commit()
    return result


def get_record(*, uow: UnitOfWork, kind: str, external_id: str) -> StoredRecord:
    stored = RecordRepository(uow.connection).get(kind, external_id)
    if stored is None:
        raise RecordNotFound(kind, external_id)
    return stored


# --- NDJSON import ---------------------------------------------------------------------------


class LineStatus(StrEnum):
    created = "created"
    updated = "updated"
    unchanged = "unchanged"
    rejected = "rejected"


@dataclass(frozen=True, slots=True)
class LineResult:
    """The report for one line of an import."""

    line: int
    status: LineStatus
    kind: str | None = None
    external_id: str | None = None
    version: int | None = None
    problems: Sequence[Problem] = field(default_factory=tuple)

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"line": self.line, "status": self.status.value}
        if self.kind is not None:
            out["kind"] = self.kind
        if self.external_id is not None:
            out["external_id"] = self.external_id
        if self.version is not None:
            out["version"] = self.version
        if self.problems:
            out["errors"] = [problem.as_json() for problem in self.problems]
        return out


@dataclass
class ImportSummary:
    """Counts over every line of an import."""

    lines: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0

    def add(self, result: LineResult) -> None:
        self.lines += 1
        setattr(self, result.status.value, getattr(self, result.status.value) + 1)

    def as_json(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "accepted": self.created + self.updated + self.unchanged,
            "created": self.created,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
        }


def _parse_line(number: int, raw: bytes) -> RecordModel | LineResult:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        problem = Problem((), "json_invalid", f"not valid JSON: {error}")
        return LineResult(number, LineStatus.rejected, problems=(problem,))
    kind = data.get("kind") if isinstance(data, dict) else None
    external_id = data.get("external_id") if isinstance(data, dict) else None
    try:
        return parse_record(data)
    except InvalidRecord as invalid:
        return LineResult(
            number,
            LineStatus.rejected,
            kind=kind if isinstance(kind, str) and kind in RECORD_TYPES else None,
            external_id=external_id if isinstance(external_id, str) else None,
            problems=tuple(invalid.problems),
        )


def import_ndjson(
    *,
    database: Database,
    materializer: Materializer,
    lines: Iterable[bytes],
    actor: str,
    request_id: str | None = None,
    batch_size: int = 500,
) -> Iterator[list[LineResult]]:
    """Import NDJSON records, yielding each batch's line reports once the batch is committed.

    Every line is all-or-nothing: a rejected line stores nothing and the others go on. Lines are
    applied kind by kind (patients, clinicians, diagnoses, courses, sessions, assessments), in file
    order within a kind, so a reference resolves against the whole file as well as the store.
    A line that refers to a record rejected elsewhere in the file says which line that was.
    """
    parsed: list[tuple[int, RecordModel]] = []
    rejected_now: list[LineResult] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        outcome = _parse_line(number, raw)
        if isinstance(outcome, LineResult):
            rejected_now.append(outcome)
        else:
            parsed.append((number, outcome))
    if rejected_now:
        yield rejected_now
    rejected_keys: dict[tuple[str, str], int] = {
        (result.kind, result.external_id): result.line
        for result in rejected_now
        if result.kind is not None and result.external_id is not None
    }
    parsed.sort(key=lambda item: KIND_ORDER[item[1].kind])

    for start in range(0, len(parsed), batch_size):
        batch = parsed[start : start + batch_size]
        with database.unit_of_work(write=True) as uow:
            results = _import_batch(uow, materializer, batch, rejected_keys, actor, request_id)
            written = [
                (str(r.kind), str(r.external_id))
                for r in results
                if r.status in (LineStatus.created, LineStatus.updated)
            ]
            audit_record_writes(uow.connection, written, subtype="import", actor=actor)
            uow.commit()
        yield results


class _InsertRace(Exception):
    """Another writer created one of the batch's records after the batch read them."""


def _import_batch(
    uow: UnitOfWork,
    materializer: Materializer,
    batch: list[tuple[int, RecordModel]],
    rejected_keys: dict[tuple[str, str], int],
    actor: str,
    request_id: str | None,
) -> list[LineResult]:
    """Write one batch with a handful of statements; line by line after a race or a failure.

    The line-by-line path gives each line its own savepoint, so a line that fails late (another
    writer's insert, a resource that will not validate) is rejected alone.
    """
    try:
        with uow.connection.begin_nested():
            return _write_batch(
                uow, materializer, batch, dict(rejected_keys), actor, request_id, rejected_keys
            )
    except (_InsertRace, InvalidRecord):
        return _write_lines(uow, materializer, batch, rejected_keys, actor, request_id)


def _batch_lookup(
    repository: RecordRepository, batch: list[tuple[int, RecordModel]]
) -> tuple[dict[tuple[str, str], RecordModel | None], Lookup]:
    """A lookup over the records a batch refers to, fetched in one query and kept current."""
    wanted = {ref for _, record in batch for ref in _references(record)}
    fetched = repository.get_many(wanted)
    known: dict[tuple[str, str], RecordModel | None] = {}

    def lookup(kind: str, external_id: str) -> RecordModel | None:
        key = (kind, external_id)
        if key not in known:
            stored = fetched.get(key) if key in wanted else repository.get(kind, external_id)
            known[key] = None if stored is None else load(stored)
        return known[key]

    return known, lookup


def _write_batch(
    uow: UnitOfWork,
    materializer: Materializer,
    batch: list[tuple[int, RecordModel]],
    rejected_before: dict[tuple[str, str], int],
    actor: str,
    request_id: str | None,
    rejected_keys: dict[tuple[str, str], int],
) -> list[LineResult]:
    # Hand-batched rather than per-record upserts: on PostgreSQL each statement is a round trip,
    # and a batch of 500 lines in five statements is what makes bulk intake fast.
    repository = RecordRepository(uow.connection)
    now = datetime.now(UTC)
    own: set[tuple[str, str]] = {(record.kind, record.external_id) for _, record in batch}
    current: dict[tuple[str, str], StoredRecord | None] = dict.fromkeys(own)
    current |= repository.get_many(own, for_update=True)
    known, lookup = _batch_lookup(repository, batch)
    created: list[StoredRecord] = []
    updated: list[StoredRecord] = []
    changes: list[RecordChange] = []
    versions: list[RecordVersion] = []
    results: list[LineResult] = []
    newly_rejected: dict[tuple[str, str], int] = {}
    for number, record in batch:
        key = (record.kind, record.external_id)
        try:
            plan = plan_write(
                record=record,
                current=current[key],
                lookup=lookup,
                actor=actor,
                request_id=request_id,
                now=now,
            )
        except InvalidRecord as invalid:
            results.append(_rejected(number, record, invalid, rejected_before | newly_rejected))
            newly_rejected[key] = number
            continue
        if plan.outcome is Outcome.created:
            created.append(plan.stored)
        elif plan.outcome is Outcome.updated:
            updated.append(plan.stored)
        if plan.outcome is not Outcome.unchanged:
            versions.append(RecordVersion(record, plan.stored, current[key]))
        if plan.change is not None:
            changes.append(plan.change)
        current[key] = plan.stored
        known[key] = record
        results.append(
            LineResult(number, LineStatus(plan.outcome.value), *key, plan.stored.version)
        )
    if repository.insert_many(created) != len(created):
        raise _InsertRace
    repository.replace_many(updated)
    repository.add_changes(changes)
    materializer.apply(uow.connection, versions, now=now)
    rejected_keys.update(newly_rejected)
    return results


def _write_lines(
    uow: UnitOfWork,
    materializer: Materializer,
    batch: list[tuple[int, RecordModel]],
    rejected_keys: dict[tuple[str, str], int],
    actor: str,
    request_id: str | None,
) -> list[LineResult]:
    """The careful path: one savepoint per line, each write re-reading its record."""
    repository = RecordRepository(uow.connection)
    known, lookup = _batch_lookup(repository, batch)
    results = []
    for number, record in batch:
        key = (record.kind, record.external_id)
        try:
            with uow.connection.begin_nested():
                written = write_record(
                    repository=repository,
                    record=record,
                    lookup=lookup,
                    actor=actor,
                    request_id=request_id,
                )
                if written.outcome is not Outcome.unchanged:
                    materializer.apply(
                        uow.connection,
                        [RecordVersion(record, written.stored, written.previous)],
                        now=written.stored.updated_at,
                    )
        except InvalidRecord as invalid:
            results.append(_rejected(number, record, invalid, rejected_keys))
            rejected_keys[key] = number
            continue
        known[key] = record
        results.append(
            LineResult(number, LineStatus(written.outcome.value), *key, written.stored.version)
        )
    return results


_REFERENCE_FIELDS: dict[str, str] = {
    "patient": "patient",
    "diagnosis": "diagnosis",
    "prescriber": "clinician",
    "course": "course",
    "administered_by": "clinician",
    "supervised_by": "clinician",
}
"""Reference fields of the intake contract and the record kind each one names."""


def _references(record: RecordModel) -> Iterator[tuple[str, str]]:
    for name, kind in _REFERENCE_FIELDS.items():
        value = getattr(record, name, None)
        if isinstance(value, str):
            yield kind, value


def _rejected(
    number: int, record: RecordModel, invalid: InvalidRecord, rejected: dict[tuple[str, str], int]
) -> LineResult:
    """The report of a line whose record failed, naming any rejected line it depended on."""
    problems = tuple(_explain_rejected_reference(p, record, rejected) for p in invalid.problems)
    return LineResult(
        number, LineStatus.rejected, record.kind, record.external_id, problems=problems
    )


def _explain_rejected_reference(
    problem: Problem, record: RecordModel, rejected: dict[tuple[str, str], int]
) -> Problem:
    if problem.type != "unresolved_reference" or not problem.loc:
        return problem
    name = str(problem.loc[0])
    kind, target = _REFERENCE_FIELDS.get(name), getattr(record, name, None)
    line = rejected.get((kind, target)) if kind and isinstance(target, str) else None
    if line is None:
        return problem
    return Problem(problem.loc, problem.type, f"{problem.message} (line {line} was rejected)")
