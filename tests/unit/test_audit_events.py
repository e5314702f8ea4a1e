"""The AuditEvents the writer stores, against the from-scratch event and the generic extraction.

The writer builds each event from the parts it shares with the other events of its client,
address, interaction and outcome, serializes it once and takes its index rows from those
parts; what it stores must be what building, serializing and indexing each event on its own
gives.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.fhir.search_index import extract
from service.security.audit import (
    AuditRecord,
    _event_id,
    _meta,
    _prepare,
    _stored_body,
    audit_event,
    audit_index_rows,
)
from service.store.resources import content_hash, with_version


def reference_event(record: AuditRecord, *, event_id: str, now: datetime) -> dict[str, Any]:
    """The AuditEvent of a record built from scratch (as every event was before templates)."""
    rest = record.subtype not in ("intake", "import", "sync", "token")
    agent: dict[str, Any] = {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                    "code": "datacollector" if not rest else "dataprocessor",
                }
            ]
        },
        "who": {
            "identifier": {
                "system": "urn:infusion-bridge:client",
                "value": record.client_id or "unknown",
            }
        },
        "requestor": True,
    }
    if record.address:
        agent["network"] = {"address": record.address[:200], "type": "2"}
    kinds = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
    roles = "http://terminology.hl7.org/CodeSystem/object-role"

    def coding(system: str, code: str) -> dict[str, str]:
        return {"system": system, "code": code}

    entities: list[dict[str, Any]] = []
    for patient in dict.fromkeys(record.patients):
        entities.append(
            {
                "what": {"reference": f"Patient/{patient}"},
                "type": coding(kinds, "1"),
                "role": coding(roles, "1"),
            }
        )
    for reference in dict.fromkeys(record.entities):
        entities.append(
            {
                "what": {"reference": reference},
                "type": coding(kinds, "2"),
                "role": coding(roles, "4"),
            }
        )
    for key in dict.fromkeys(record.records):
        kind, _, external_id = key.partition("/")
        entities.append(
            {
                "what": {
                    "identifier": {
                        "system": f"urn:infusion-bridge:record:{kind}",
                        "value": external_id,
                    }
                },
                "type": coding(kinds, "2"),
                "role": coding(roles, "4"),
            }
        )
    if record.query:
        entities.append(
            {
                "type": coding(kinds, "2"),
                "role": coding(roles, "24"),
                "query": base64.b64encode(record.query.encode()).decode(),
            }
        )
    if record.request_id:
        entities.append(
            {
                "type": coding(kinds, "4"),
                "detail": [{"type": "request-id", "valueString": record.request_id}],
            }
        )
    actions = {"create": "C", "read": "R", "vread": "R", "update": "U", "patch": "U"}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": event_id,
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest" if rest else "110100",
            "display": "RESTful Operation" if rest else "Application Activity",
        },
        "subtype": [
            {
                "system": "http://hl7.org/fhir/restful-interaction"
                if rest
                else "urn:infusion-bridge:operation",
                "code": record.subtype,
            }
        ],
        "action": record.action or actions.get(record.subtype, "E"),
        "recorded": now.isoformat(),
        "outcome": record.outcome,
        "agent": [agent],
        "source": {
            "observer": {"display": "Infusion Bridge"},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                }
            ],
        },
    }
    if record.description:
        event["outcomeDesc"] = record.description[:500]
    if entities:
        event["entity"] = entities
    return event


_SUBTYPES = (
    "read",
    "vread",
    "search-type",
    "create",
    "update",
    "delete",
    "transaction",
    "intake",
    "import",
    "sync",
    "token",
)
_REFERENCES = st.one_of(
    st.builds(
        "{}/{}/_history/{}".format,
        st.sampled_from(("Patient", "Observation", "CarePlan")),
        st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True),
        st.integers(1, 9),
    ),
    st.builds(
        "{}/{}".format,
        st.sampled_from(("Patient", "Goal")),
        st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True),
    ),
    st.text(max_size=80),
)
_NOW = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
) | st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
).map(lambda moment: moment.replace(microsecond=0))


@settings(max_examples=400, deadline=None)
@given(
    subtype=st.sampled_from(_SUBTYPES),
    outcome=st.sampled_from(("0", "4", "8")),
    action=st.none() | st.sampled_from(("C", "R", "U", "D", "E")),
    client_id=st.none() | st.sampled_from(("c-1", "ehr", "d\u00e9mo")),
    entities=st.lists(_REFERENCES, max_size=4),
    records=st.lists(st.builds("session/{}".format, st.text(min_size=1, max_size=20)), max_size=2),
    patients=st.lists(st.from_regex(r"[a-z0-9\-]{1,64}", fullmatch=True), max_size=3),
    query=st.none() | st.text(max_size=300),
    description=st.none() | st.text(max_size=600),
    address=st.none() | st.text(max_size=300),
    request_id=st.none() | st.text(max_size=40),
    now=_NOW,
    stored=_NOW,
)
def test_a_stored_event_is_the_from_scratch_event_its_hash_and_its_generic_index_rows(
    subtype: str,
    outcome: str,
    action: str | None,
    client_id: str | None,
    entities: list[str],
    records: list[str],
    patients: list[str],
    query: str | None,
    description: str | None,
    address: str | None,
    request_id: str | None,
    now: datetime,
    stored: datetime,
) -> None:
    record = AuditRecord(
        subtype=subtype,
        outcome=outcome,
        entities=entities,
        records=records,
        patients=patients,
        query=query,
        description=description,
        client_id=client_id,
        request_id=request_id,
        address=address,
        action=action,
    )
    prepared = _prepare(record, now=now)
    event = reference_event(record, event_id=prepared.id, now=now)
    assert prepared.content == orjson.dumps(event)
    assert prepared.digest == content_hash(event) == hashlib.sha256(orjson.dumps(event)).hexdigest()
    resource = with_version(event, 1, stored)
    assert _stored_body(prepared, _meta(stored)) == orjson.dumps(resource).decode()

    generic = extract(resource)
    fast = prepared.rows
    for kind in ("strings", "tokens", "dates", "references"):
        rows = getattr(fast, kind)
        assert set(rows) == set(getattr(generic, kind)), kind
        assert len(rows) == len(set(rows)), kind  # no duplicate rows
        assert rows == getattr(audit_index_rows(resource), kind), kind
    assert not generic.quantities
    assert not generic.composites

    public = audit_event(record, now=now)
    assert public == event | {"id": public["id"]}


def test_the_event_ids_are_version_7_uuids_in_the_order_they_were_made() -> None:
    ids = [_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for event_id in ids:
        parsed = uuid.UUID(event_id)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == event_id
    moments = [int(event_id.replace("-", "")[:12], 16) for event_id in ids]
    assert moments == sorted(moments)
    made = datetime.fromtimestamp(moments[-1] / 1000, UTC)
    assert abs(made - datetime.now(UTC)) < timedelta(seconds=5)


def test_the_events_of_a_shape_do_not_share_what_a_caller_may_change() -> None:
    record = AuditRecord(subtype="read", entities=["Observation/1"], client_id="c-1")
    first = audit_event(record, now=datetime.now(UTC))
    first["agent"][0]["who"]["identifier"]["value"] = "someone else"
    first["type"]["code"] = "changed"
    second = audit_event(record, now=datetime.now(UTC))
    assert second["agent"][0]["who"]["identifier"]["value"] == "c-1"
    assert second["type"]["code"] == "rest"
