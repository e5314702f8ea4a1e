"""What one EHR receives for a stored resource: pure functions, no database and no HTTP.

- `translate`: the stored resource with the service's version metadata removed and every
  reference pointing where the EHR can resolve it: the EHR's Patient found by identifier, the
  remote id the ledger holds, a `urn:uuid:` of another entry of the same transaction, or, when
  the EHR holds no copy of the target, a logical reference by the target's business identifier.
- `identifier_lookup`: the search that finds the EHR's copy of a resource by business
  identifier, within the patient delivery matched in that EHR where the type allows it.
- `infusion_summary` and `document_reference`: the readable DocumentReference that stands in for
  a MedicationAdministration or score Observation an EHR cannot take.
"""

from __future__ import annotations

import base64
import functools
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote_plus

import orjson

from service.json_text import dump_json, load_json
from service.records.models import Assessment, InfusionSession, RecordModel
from service.sync.client import parse_location
from service.sync.strategy import TypeSupport

Resource = dict[str, Any]
Key = tuple[str, str]

LOINC = "http://loinc.org"
SUMMARY_LOINC = "11506-3"  # Progress note
SUMMARY_TYPE_TEXT = "Ketamine infusion summary"


class UnresolvedPatient(Exception):
    """The resource names a Patient the EHR has no match for."""


def references(value: Any) -> list[dict[str, Any]]:
    """Every Reference-like object (a dict with a string `reference`) inside a resource, in
    document order, outside `contained`.

    Iterative, not a recursive generator: every delivered resource is looked through, twice.
    """
    found: list[dict[str, Any]] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("reference"), str):
                found.append(item)
            children = [
                child
                for key, child in item.items()
                if key != "contained" and isinstance(child, dict | list)
            ]
        elif isinstance(item, list):
            children = [child for child in item if isinstance(child, dict | list)]
        else:
            continue
        children.reverse()  # popped first to last: document order
        stack += children
    return found


def relative_key(reference: str) -> Key | None:
    parts = reference.split("/")
    if len(parts) == 2 and parts[0][:1].isupper() and parts[1]:
        return parts[0], parts[1]
    return None


def business_identifier(resource: Resource, site_system: str) -> dict[str, str] | None:
    """The resource's identifier in the site's own systems (`{site_system}/{kind}`), if any."""
    prefix = site_system.rstrip("/") + "/"
    found = resource.get("identifier") or []
    # AdverseEvent (among others) has one identifier, not a list.
    for identifier in [found] if isinstance(found, dict) else found:
        if not isinstance(identifier, dict):
            continue
        system, value = identifier.get("system"), identifier.get("value")
        if isinstance(system, str) and system.startswith(prefix) and isinstance(value, str):
            return {"system": system, "value": value}
    return None


@functools.lru_cache(maxsize=256)
def _quoted(text: str) -> str:
    return quote_plus(text)


def identifier_query(identifier: Mapping[str, str]) -> str:
    """`identifier=system|value`, form-encoded as `urlencode` would (the system quoted once)."""
    return f"identifier={_quoted(identifier['system'])}%7C{quote_plus(identifier['value'])}"


PATIENT_SEARCH_TYPES = frozenset(
    {
        "CarePlan",
        "Condition",
        "DocumentReference",
        "Encounter",
        "Goal",
        "MedicationAdministration",
        "MedicationRequest",
        "Observation",
        "QuestionnaireResponse",
    }
)
"""Types we send whose R4 `patient` search parameter names the patient the resource is about.

Not Provenance (its `patient` matches only a Provenance whose target is the Patient itself),
not AdverseEvent (R4 gives it `subject`, and no identifier search), nor the types outside a
patient's compartment (Patient, Practitioner, Organization).
"""


def identifier_lookup(
    resource_type: str,
    identifier: Mapping[str, str],
    *,
    patient: str | None,
    support: TypeSupport,
) -> list[tuple[str, str]]:
    """The search parameters that find the EHR's copy of a resource by business identifier.

    Within the EHR's Patient `patient` (its id) where the type is searched by patient and the
    EHR's CapabilityStatement does not leave `patient` out: EHRs such as Epic and Oracle Health
    refuse a search of CarePlans (among others) that names no patient, so a lookup without one
    would end the change as a dead letter. Without a matched patient, by identifier alone.
    """
    params = [("identifier", f"{identifier['system']}|{identifier['value']}")]
    if (
        patient is not None
        and resource_type in PATIENT_SEARCH_TYPES
        and support.searches_by("patient")
    ):
        params.append(("patient", patient))
    return params


def translate(
    resource: Resource,
    *,
    remote_id: str | None,
    remote_of: Callable[[Key], str | None],
    identifier_of: Callable[[Key], dict[str, str] | None],
    in_bundle: frozenset[Key] = frozenset(),
) -> Resource:
    """The resource as this EHR receives it (see the module docstring); a new dict.

    `remote_of` gives the EHR's id of a target (the Patient match included; a Patient with none
    raises `UnresolvedPatient`), `identifier_of` a target's business identifier.
    """
    translated: Resource = load_json(
        translate_json(
            resource,
            remote_id=remote_id,
            remote_of=remote_of,
            identifier_of=identifier_of,
            in_bundle=in_bundle,
        )
    )
    return translated


# A resource's references are found in its compact JSON (orjson writes no whitespace) by a
# regex over the bytes rather than by a walk through every element: the walk cost the worker
# more than anything else it does per resource. `"reference":"` with unescaped quotes can only
# be a key and the start of its string value, at any depth, where the walk finds a Reference.
# `contained` resources are not looked into, so JSON that holds the word goes the walk's way.
_STRING = rb'"([^"\\]*(?:\\.[^"\\]*)*)"'
_REFERENCE_VALUE = re.compile(rb'"reference":' + _STRING)
_REFERENCE = re.compile(rb'"reference":' + _STRING + rb'(?:,"display":' + _STRING + rb")?(\})?")
"""A reference; when it ends its Reference (perhaps after a `display`), the closing brace too,
so that a whole Reference (`{` just before the match) can become a logical one in the bytes.
(The regex starts with its literal, which is what lets it skip quickly through the bytes.)"""
_CONTAINED = b'"contained"'


def _reference_text(raw: bytes) -> str:
    text: str = orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
    return text


def referenced_keys(resource: Resource) -> set[Key]:
    """The (type, id) of every relative reference in the resource, outside `contained`."""
    data = dump_json(resource)
    if _CONTAINED in data:
        refs = [ref["reference"] for ref in references(resource)]
    else:
        refs = [_reference_text(m.group(1)) for m in _REFERENCE_VALUE.finditer(data)]
    return {key for ref in refs if (key := relative_key(ref)) is not None}


def translate_json(
    resource: Resource,
    *,
    remote_id: str | None,
    remote_of: Callable[[Key], str | None],
    identifier_of: Callable[[Key], dict[str, str] | None],
    in_bundle: frozenset[Key] = frozenset(),
    id_last: str | None = None,
) -> bytes:
    """`translate`, as the JSON the EHR receives (orjson's, to embed as an `orjson.Fragment`).

    `id_last` (with no `remote_id`) gives the resource that id as its last member, as a PUT of
    our own id names it. References that only change their target are rewritten in the bytes;
    a resource with one the EHR holds no copy of (it becomes a logical reference) is rewritten
    element by element.
    """
    out: Resource = dict(resource)  # shallow: only the top level changes before serialising
    meta = dict(out.get("meta") or {})
    for name in ("versionId", "lastUpdated", "source"):
        meta.pop(name, None)
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    if remote_id is None:
        out.pop("id", None)
        if id_last is not None:
            out["id"] = id_last
    else:
        out["id"] = remote_id
    data = dump_json(out)
    resolved: dict[Key, str | None] = {}

    def target(key: Key) -> str | None:
        """The new `reference` of a reference to `key`; None: it becomes a logical reference.

        Each target's `remote_of` is asked once, in document order, as the walk asks it."""
        if key in in_bundle:
            return f"urn:uuid:{_urn(key)}"
        if key not in resolved:
            resolved[key] = remote_of(key)
        found = resolved[key]
        if found is not None:
            return f"{key[0]}/{found}"
        if key[0] == "Patient":
            raise UnresolvedPatient(key[1])
        return None

    if _CONTAINED not in data:
        pieces: list[bytes] = []
        done = 0
        for match in _REFERENCE.finditer(data):
            raw, display, closed = match.groups()
            key = relative_key(_reference_text(raw))
            if key is None:
                continue
            new = target(key)
            start, end = match.span()
            if new is not None:
                start = match.start(1) - 1  # the value's opening quote
                end = match.end(1) + 1
                replacement = orjson.dumps(new)
            elif closed is not None and data[start - 1 : start] == b"{":
                start -= 1
                replacement = orjson.dumps(
                    _logical(
                        {} if display is None else {"display": _reference_text(display)},
                        key,
                        identifier_of,
                    )
                )
            else:
                break  # a logical reference inside a larger element: element by element
            pieces += (data[done:start], replacement)
            done = end
        else:
            if not pieces:
                return data
            pieces.append(data[done:])
            return b"".join(pieces)
    # A logical reference changes the shape of its element, or `contained` is to be left
    # alone: rewrite a copy element by element.
    copy: Resource = load_json(data)
    for ref in references(copy):
        key = relative_key(ref["reference"])
        if key is None:
            continue
        new = target(key)
        if new is not None:
            ref["reference"] = new
            continue
        del ref["reference"]
        _logical(ref, key, identifier_of)
    return dump_json(copy)


def _logical(
    ref: dict[str, Any], key: Key, identifier_of: Callable[[Key], dict[str, str] | None]
) -> dict[str, Any]:
    """A Reference (its `reference` removed) to a resource the EHR holds no copy of, made
    logical: by the target's business identifier, or at least a display."""
    identifier = ref.get("identifier") or identifier_of(key)
    if identifier is not None:
        ref["identifier"] = identifier
        ref.setdefault("type", key[0])
    if not ref.get("identifier") and not ref.get("display"):
        ref["display"] = f"{key[0]} kept by the infusion clinic"
    return ref


@functools.lru_cache(maxsize=65_536)
def _urn(key: Key) -> str:
    """`uuid5(NAMESPACE_URL, "Type/id")`: the same for every delivery of the resource."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{key[0]}/{key[1]}"))


def bundle_full_url(key: Key) -> str:
    return f"urn:uuid:{_urn(key)}"


# --- the DocumentReference fallback -----------------------------------------------------------


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M %z") if value else "-"


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def infusion_summary(record: RecordModel) -> str:
    """A readable summary of an infusion session (or a standalone rating-scale assessment)."""
    if isinstance(record, InfusionSession):
        return _session_summary(record)
    if isinstance(record, Assessment):
        lines = [
            f"Rating-scale assessment {record.external_id}",
            f"Instrument: {record.instrument.value.upper()}   timing: {record.timing.value}",
            f"Administered: {_when(record.administered_at)}",
            f"Total score: {record.total}",
        ]
        if record.items:
            lines.append("Items: " + ", ".join(str(i) for i in record.items))
        return "\n".join(lines) + "\n"
    raise ValueError(f"no summary for a {record.kind} record")


def _session_summary(session: InfusionSession) -> str:
    lines = [
        f"Ketamine infusion session {session.external_id} (course {session.course})",
        f"Status: {session.status.value}"
        + (f" ({session.status_reason})" if session.status_reason else ""),
        f"Scheduled: {_when(session.scheduled_start)}   started: {_when(session.started_at)}"
        f"   ended: {_when(session.ended_at)}",
    ]
    if session.total_dose_mg is not None:
        dose = f"Dose: {session.total_dose_mg:g} mg IV"
        if session.dose_mg_per_kg is not None:
            dose += f" ({session.dose_mg_per_kg:g} mg/kg"
            dose += f" at {session.weight_kg:g} kg)" if session.weight_kg else ")"
        if session.rate_mg_per_hour is not None:
            dose += f", rate {session.rate_mg_per_hour:g} mg/h"
        lines.append(dose)
    if session.site is not None:
        lines.append(f"Site: {session.site.value.replace('_', ' ')}")
    if session.vitals:
        lines += ["", "Vital signs", "time              phase   BP mmHg   HR/min  RR/min  SpO2 %"]
        for v in sorted(session.vitals, key=lambda v: v.taken_at):
            bp = f"{v.systolic}/{v.diastolic}" if v.systolic and v.diastolic else "-"
            lines.append(
                f"{v.taken_at.strftime('%Y-%m-%d %H:%M')}  {v.phase.value:<6}  {bp:<8}  "
                f"{_cell(v.heart_rate):<6}  {_cell(v.resp_rate):<6}  {_cell(v.spo2)}"
            )
    if session.assessments:
        lines += ["", "Scores"]
        for a in session.assessments:
            lines.append(
                f"{a.instrument.value.upper()} {a.timing.value.replace('_', '-')}: {a.total}"
                f" ({_when(a.administered_at)})"
            )
    lines += ["", "Adverse events"]
    if not session.adverse_events:
        lines.append("none recorded")
    for event in session.adverse_events:
        text = f"{event.kind.value} ({event.severity.value}"
        text += ", serious)" if event.serious else ")"
        text += f", onset {_when(event.onset_at)}, action {event.action.value.replace('_', ' ')}"
        text += f", resolved {_when(event.resolved_at)}" if event.resolved_at else ", unresolved"
        lines.append(text)
    return "\n".join(lines) + "\n"


def document_reference(
    *,
    record: RecordModel,
    identifier: dict[str, str],
    subject: dict[str, Any],
    encounter: dict[str, Any] | None,
    author_display: str,
) -> Resource:
    """The DocumentReference carrying `infusion_summary(record)` as plain text."""
    text = infusion_summary(record)
    when = record.scheduled_start if isinstance(record, InfusionSession) else None
    if isinstance(record, Assessment):
        when = record.administered_at
    resource: Resource = {
        "resourceType": "DocumentReference",
        "identifier": [identifier],
        "status": "current",
        "docStatus": "final",
        "type": {
            "coding": [{"system": LOINC, "code": SUMMARY_LOINC, "display": "Progress note"}],
            "text": SUMMARY_TYPE_TEXT,
        },
        "subject": subject,
        "description": text.splitlines()[0],
        "author": [{"display": author_display}],
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(text.encode()).decode(),
                    "title": text.splitlines()[0],
                }
            }
        ],
    }
    if when is not None:
        resource["date"] = when.isoformat()
    if encounter is not None:
        resource["context"] = {"encounter": [encounter]}
    return resource


def summary_identifier(site_system: str, kind: str, external_id: str) -> dict[str, str]:
    return {"system": f"{site_system.rstrip('/')}/{kind}", "value": f"{external_id}/summary"}


def remote_version(entry_response: Mapping[str, Any]) -> tuple[str, str | None]:
    """(id, version) from a transaction response entry's `location` and `etag`."""
    return parse_location(entry_response.get("location"), None, entry_response.get("etag"))
