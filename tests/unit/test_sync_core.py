"""Pure parts of EHR delivery: destinations, strategies, translation, backoff, merge, SMART."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.records.models import CourseStatus, Protocol, TreatmentCourse
from service.records.service import parse_record
from service.sync.care_plans import NotificationError, merge, parse_notification
from service.sync.client import (
    EhrClient,
    PermanentFailure,
    TransientFailure,
    VersionConflict,
    check,
    retry_after_seconds,
)
from service.sync.destinations import (
    DestinationsError,
    Strategy,
    load_destinations,
    parse_destinations,
)
from service.sync.outbound import identifier_lookup, infusion_summary, translate
from service.sync.strategy import TypeSupport, plan, read_capabilities
from service.sync.worker import backoff
from tests import factory

ROOT = Path(__file__).resolve().parents[2]

YAML = """
destinations:
  - name: county-ehr
    base_url: https://ehr.example.org/fhir/R4
    auth: {type: smart-backend, client_id: infusion-bridge, private_key: /etc/ib/ehr-key.pem,
           scope: "system/Observation.c system/DocumentReference.c system/Patient.rs"}
    send: [MedicationAdministration, Observation, CarePlan, AdverseEvent]
    patients: {match_identifier_system: "urn:oid:2.16.840.1.113883.3.7777.1", create_missing: false}
    strategy: {MedicationAdministration: document-reference}
    care_plan_sync: {poll_interval_seconds: 60}
    rate_limit_per_second: 20
"""


def test_the_design_example_parses() -> None:
    (county,) = parse_destinations(YAML)
    assert county.name == "county-ehr"
    assert county.base == "https://ehr.example.org/fhir/R4"
    assert county.auth.type == "smart-backend"
    assert county.strategy == {"MedicationAdministration": Strategy.document_reference}
    assert county.care_plan_sync is not None
    assert county.care_plan_sync.poll_interval_seconds == 60
    assert county.sends("Observation")
    assert not county.sends("Goal")


def test_the_sandbox_file_parses() -> None:
    (hapi,) = load_destinations(ROOT / "config" / "sandbox-destinations.yaml")
    assert hapi.patients.create_missing


_M = "patients: {match_identifier_system: s}"
_F = "base_url: 'http://f'"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"destinations: [{{name: x, base_url: 'not a url', {_M}}}]", "base_url"),
        (f"destinations: [{{name: x, base_url: 'http://e', {_M}, auth: {{type: basic}}}}]", "auth"),
        (f"destinations: [{{name: x, base_url: 'http://e', {_M}, strategy: {{A: fax}}}}]", "strat"),
        ("destinations: [{name: x, base_url: 'http://e'}]", "patients"),
        (
            f"destinations: [{{name: x, base_url: 'http://e', {_M}}}, {{name: x, {_M}, {_F}}}]",
            "unique",
        ),
        (": : :", "not YAML"),
        (
            f"destinations: [{{name: x, {_F}, {_M}, care_plan_sync: {{by_patient: often}}}}]",
            "care_plan_sync.by_patient: Input should be a valid boolean",
        ),
        (
            f"destinations: [{{name: x, {_F}, {_M}, care_plan_sync: {{by_patient: 1}}}}]",
            "care_plan_sync.by_patient: Input should be a valid boolean",
        ),
    ],
)
def test_a_bad_destinations_file_names_the_problem(text: str, problem: str) -> None:
    with pytest.raises(DestinationsError, match=problem):
        parse_destinations(text)


def test_care_plans_may_be_polled_per_patient() -> None:
    on, off = parse_destinations(
        f"""
destinations:
  - {{name: epic, {_F}, {_M}, care_plan_sync: {{by_patient: true}}}}
  - {{name: hapi, {_F}, {_M}, care_plan_sync: {{poll_interval_seconds: 30}}}}
"""
    )
    assert on.care_plan_sync is not None
    assert on.care_plan_sync.by_patient
    assert off.care_plan_sync is not None
    assert not off.care_plan_sync.by_patient


def _statement(resources: list[dict[str, Any]], *, transaction: bool = False) -> dict[str, Any]:
    rest: dict[str, Any] = {"mode": "server", "resource": resources}
    if transaction:
        rest["interaction"] = [{"code": "transaction"}]
    return {"resourceType": "CapabilityStatement", "rest": [rest]}


def _type(name: str, *codes: str, conditional: bool = False) -> dict[str, Any]:
    return {
        "type": name,
        "interaction": [{"code": c} for c in codes],
        "conditionalUpdate": conditional,
    }


def test_strategies_follow_the_capability_statement_and_overrides() -> None:
    (destination,) = parse_destinations(
        YAML.replace(
            "send: [MedicationAdministration, Observation, CarePlan, AdverseEvent]",
            "send: [MedicationAdministration, Observation, CarePlan, AdverseEvent, Goal,"
            " Encounter]",
        )
    )
    epic_like = _statement(
        [
            _type("Observation", "create", "read", "search-type"),
            _type("DocumentReference", "create", "read"),
            _type("MedicationAdministration", "read", "search-type"),
            _type("CarePlan", "read", "search-type"),
            _type("AdverseEvent", "create", "update", conditional=True),
        ]
    )
    chosen = plan(destination, epic_like).as_json()
    assert chosen == {
        "AdverseEvent": "conditional-update",
        "CarePlan": "unsupported",
        "Encounter": "unsupported",
        "Goal": "unsupported",
        "MedicationAdministration": "document-reference",  # the override
        "Observation": "ledger",
    }
    full = _statement(
        [_type(t, "create", "update", conditional=True) for t in ("Observation", "CarePlan")],
        transaction=True,
    )
    assert plan(destination, full).as_json()["Observation"] == "transaction"
    no_docs = _statement([_type("MedicationAdministration", "read")])
    destination = destination.model_copy(update={"strategy": {}})
    assert plan(destination, no_docs).of("MedicationAdministration") is Strategy.unsupported


def test_capabilities_ignore_client_mode_and_junk() -> None:
    statement = {"rest": [{"mode": "client", "resource": [_type("Observation", "create")]}, 7]}
    assert read_capabilities(statement).types == {}


def test_translate_points_references_where_the_ehr_resolves_them() -> None:
    resource = {
        "resourceType": "Observation",
        "id": "ours",
        "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:00Z", "profile": ["p"]},
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "performer": [{"reference": "Practitioner/c1"}],
        "derivedFrom": [{"reference": "QuestionnaireResponse/q1"}],
        "hasMember": [{"reference": "Observation/o2"}],
    }
    remote = {("Patient", "p1"): "EHR-P", ("Encounter", "e1"): "EHR-E"}
    identifiers = {("Practitioner", "c1"): {"system": "http://s/clinician", "value": "C-7"}}
    out = translate(
        resource,
        remote_id=None,
        remote_of=remote.get,
        identifier_of=identifiers.get,
        in_bundle=frozenset({("Observation", "o2")}),
    )
    assert out == {
        "resourceType": "Observation",
        "meta": {"profile": ["p"]},
        "subject": {"reference": "Patient/EHR-P"},
        "encounter": {"reference": "Encounter/EHR-E"},
        "performer": [
            {"identifier": {"system": "http://s/clinician", "value": "C-7"}, "type": "Practitioner"}
        ],
        "derivedFrom": [{"display": "QuestionnaireResponse kept by the infusion clinic"}],
        "hasMember": [{"reference": out["hasMember"][0]["reference"]}],
    }
    assert out["hasMember"][0]["reference"].startswith("urn:uuid:")
    assert resource["subject"] == {"reference": "Patient/p1"}  # the input is untouched


def test_identifier_lookups_search_within_the_matched_patient_where_the_type_allows() -> None:
    identifier = {"system": "http://s/course", "value": "TC-55"}
    by_identifier = ("identifier", "http://s/course|TC-55")
    unlisted = TypeSupport()
    listed = TypeSupport(search_params=frozenset({"identifier", "patient"}))
    without_patient = TypeSupport(search_params=frozenset({"identifier"}))
    cases = [
        ("CarePlan", "EHR-P", unlisted, [by_identifier, ("patient", "EHR-P")]),
        ("DocumentReference", "EHR-P", listed, [by_identifier, ("patient", "EHR-P")]),
        ("CarePlan", None, listed, [by_identifier]),  # no matched patient
        ("CarePlan", "EHR-P", without_patient, [by_identifier]),  # the EHR lists no `patient`
        ("Provenance", "EHR-P", listed, [by_identifier]),  # `patient`: a Provenance OF a Patient
        ("Practitioner", "EHR-P", listed, [by_identifier]),
    ]
    for resource_type, patient, support, expected in cases:
        found = identifier_lookup(resource_type, identifier, patient=patient, support=support)
        assert found == expected, resource_type


def test_the_infusion_summary_reads_like_a_note() -> None:
    session = parse_record(factory.clinic().session)
    text = infusion_summary(session)
    assert "Dose: 34 mg IV (0.5 mg/kg at 68 kg), rate 51 mg/h" in text
    assert "122/78" in text
    assert "141/88" in text
    assert "PHQ9 pre-infusion: 14" in text
    assert "dissociation (mild)" in text


def test_retry_after_as_seconds_or_a_date() -> None:
    assert retry_after_seconds("7") == 7
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert retry_after_seconds("soon") is None


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, TransientFailure),
        (503, TransientFailure),
        (429, TransientFailure),
        (408, TransientFailure),
        (400, PermanentFailure),
        (422, PermanentFailure),
        (404, PermanentFailure),
        (409, VersionConflict),
        (412, VersionConflict),
    ],
)
def test_statuses_map_to_domain_errors(status: int, error: type[Exception]) -> None:
    response = httpx.Response(
        status, request=httpx.Request("PUT", "http://e/Observation"), headers={"retry-after": "3"}
    )
    with pytest.raises(error):
        check(response)


def test_backoff_is_exponential_jittered_capped_and_honours_retry_after() -> None:
    delays = [
        backoff(n, base=1, cap=60, retry_after=None, jitter=lambda: 1.0) for n in (1, 2, 3, 9)
    ]
    assert delays == [1, 2, 4, 60]
    assert backoff(3, base=1, cap=60, retry_after=None, jitter=lambda: 0.0) == 2
    assert backoff(1, base=1, cap=60, retry_after=30, jitter=lambda: 0.0) == 30


def _course(**changes: Any) -> TreatmentCourse:
    base = TreatmentCourse(
        external_id="TC-1",
        patient="P-1",
        diagnosis="D-1",
        prescriber="C-1",
        protocol=Protocol(),
        start_date=date(2026, 10, 5),
        status=CourseStatus.active,
    )
    return base.model_copy(update=changes)


def test_merge_takes_the_ehrs_plan_and_records_fields_changed_on_both_sides() -> None:
    base = _course()
    clinic = _course(notes=["clinic note"], status=CourseStatus.on_hold)
    ehr = _course(status=CourseStatus.completed, end_date=date(2026, 12, 1), prescriber="C-9")
    merged, conflicts = merge(base=base, clinic=clinic, ehr=ehr)
    assert merged == _course(
        notes=["clinic note"], status=CourseStatus.on_hold, end_date=date(2026, 12, 1)
    )
    assert [(c.field, c.clinic, c.ehr, c.base) for c in conflicts] == [
        ("status", "on_hold", "completed", "active")
    ]


def test_notifications_parse_the_backport_status() -> None:
    note = parse_notification(
        {
            "resourceType": "Bundle",
            "type": "history",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Parameters",
                        "parameter": [
                            {"name": "type", "valueCode": "event-notification"},
                            {"name": "events-since-subscription-start", "valueString": "5"},
                            {
                                "name": "notification-event",
                                "part": [{"name": "event-number", "valueString": "5"}],
                            },
                        ],
                    }
                },
                {"resource": {"resourceType": "CarePlan", "id": "x"}},
            ],
        }
    )
    assert (note.type, note.events_since_start, note.event_numbers) == (
        "event-notification",
        5,
        (5,),
    )
    assert len(note.resources) == 1
    with pytest.raises(NotificationError):
        parse_notification({"resourceType": "Bundle", "type": "searchset", "entry": []})


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_smart_backend_services_signs_caches_and_refreshes(tmp_path: Path, kind: str) -> None:
    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP384R1())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "key.pem").write_bytes(pem)
    issued: list[str] = []
    seen_tokens: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/.well-known/smart-configuration"):
            return httpx.Response(200, json={"token_endpoint": "https://auth.example/token"})
        if request.url.path == "/token":
            form = dict(httpx.QueryParams(request.content.decode()))
            claims = jwt.decode(
                form["client_assertion"],
                key.public_key(),
                algorithms=["RS384", "ES384"],
                audience="https://auth.example/token",
                issuer="ib",
            )
            assert claims["sub"] == "ib"
            assert claims["exp"] - claims["iat"] <= 300
            assert jwt.get_unverified_header(form["client_assertion"])["alg"] == (
                "RS384" if kind == "rsa" else "ES384"
            )
            issued.append(f"t{len(issued)}")
            return httpx.Response(200, json={"access_token": issued[-1], "expires_in": 60})
        seen_tokens.append(request.headers["authorization"])
        if len(seen_tokens) == 3:
            return httpx.Response(401)
        return httpx.Response(200, json={"resourceType": "CapabilityStatement"})

    (destination,) = parse_destinations(
        f"""
destinations:
  - name: d
    base_url: https://ehr.example/fhir
    auth: {{type: smart-backend, client_id: ib, private_key: {tmp_path / "key.pem"},
           scope: system/Observation.c}}
    patients: {{match_identifier_system: s}}
"""
    )
    client = EhrClient(destination, transport=httpx.MockTransport(handler))
    for _ in range(3):
        client.capabilities()
    # Cached for the first two; the 401 fetched a new token once and retried.
    assert seen_tokens == ["Bearer t0", "Bearer t0", "Bearer t0", "Bearer t1"]
    client.close()
