"""Pure parts of security: SMART scope grammar and grants, the request requirements, AuditEvents."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.bootstrap import resource_validator
from service.fhir.search_index import extract
from service.security.access import RateLimiter, requirement
from service.security.audit import AuditRecord, audit_event, audit_index_rows
from service.security.scopes import InvalidScope, Scopes, parse_scope
from tests.fhir_check import assert_valid_r4


@pytest.mark.parametrize(
    ("scope", "letters"),
    [
        ("system/Observation.read", "rs"),
        ("system/Observation.write", "cud"),
        ("system/Observation.*", "cruds"),
        ("system/Observation.rs", "rs"),
        ("system/CarePlan.cu", "cu"),
        ("system/*.cruds", "cruds"),
        ("system/Patient.d", "d"),
    ],
)
def test_v1_and_v2_scopes_parse_to_their_permissions(scope: str, letters: str) -> None:
    assert parse_scope(scope).permissions == frozenset(letters)


@pytest.mark.parametrize(
    "scope",
    [
        "system/Observation.sr",
        "system/Observation.rr",
        "system/Observation.x",
        "patient/*.read",
        "system/Observation.rs?category=vital-signs",
        "openid",
        "system/.read",
        "system/Obs ervation.r",
    ],
)
def test_anything_else_is_refused_when_requested(scope: str) -> None:
    with pytest.raises(InvalidScope):
        Scopes.parse(scope, strict=True)
    assert Scopes.parse(scope).grants == ()


def test_wildcards_reach_fhir_types_but_not_the_audit_trail_or_api_areas() -> None:
    scopes = Scopes.parse("system/*.read")
    assert scopes.allows("Observation", "r")
    assert scopes.allows("Observation", "s")
    assert not scopes.allows("Observation", "c")
    assert not scopes.allows("AuditEvent", "r")
    assert not scopes.allows("intake", "r")
    assert Scopes.parse("system/AuditEvent.rs").allows("AuditEvent", "s")


def test_a_request_is_granted_only_within_the_registered_scopes() -> None:
    allowed = Scopes.parse("system/Patient.rs system/Observation.read")
    assert Scopes.parse("system/Patient.r").within(allowed)
    assert Scopes.parse("system/Observation.s").within(allowed)
    assert not Scopes.parse("system/Patient.crs").within(allowed)
    assert not Scopes.parse("system/*.r").within(allowed)
    assert Scopes.parse("system/Goal.r").within(Scopes.parse("system/*.read"))


@pytest.mark.parametrize(
    ("method", "path", "query", "needs"),
    [
        ("GET", "/fhir/Observation/1", "", [("Observation", "r")]),
        ("GET", "/fhir/Observation/1/_history/2", "", [("Observation", "r")]),
        ("GET", "/fhir/Observation/1/_history", "", [("Observation", "r")]),
        ("GET", "/fhir/Observation/_history", "", [("Observation", "s")]),
        ("GET", "/fhir/Observation", "code=x", [("Observation", "s")]),
        ("POST", "/fhir/Observation", "", [("Observation", "c")]),
        ("PUT", "/fhir/Observation/1", "", [("Observation", "u")]),
        ("PATCH", "/fhir/Observation/1", "", [("Observation", "u")]),
        ("DELETE", "/fhir/Observation/1", "", [("Observation", "d")]),
        ("DELETE", "/fhir/Observation", "code=x", [("Observation", "d"), ("Observation", "s")]),
        ("PUT", "/fhir/Observation", "code=x", [("Observation", "u"), ("Observation", "s")]),
        ("GET", "/fhir/$export", "_type=Patient,Goal", [("Patient", "r"), ("Goal", "r")]),
        ("GET", "/api/v1/patients", "", [("intake", "rs")]),
        ("PUT", "/api/v1/patients/P-1", "", [("intake", "cu")]),
        ("POST", "/api/v1/sync/dead-letters/1/retry", "", [("sync", "cud")]),
    ],
)
def test_each_interaction_needs_its_permission(
    method: str, path: str, query: str, needs: list[tuple[str, str]]
) -> None:
    params = [tuple(p.split("=", 1)) for p in query.split("&") if p]
    found = requirement(method, path, params, {})  # type: ignore[arg-type]
    assert found is not None
    assert found.checks == needs


def test_open_endpoints_need_nothing() -> None:
    for path in ("/healthz", "/readyz", "/fhir/metadata", "/auth/token", "/openapi.json"):
        assert requirement("GET", path, [], {}) is None


def test_the_rate_limiter_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert limiter.take("a") == 0
    assert limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") == 0
    now[0] = 1.0
    assert limiter.take("a") == 0


def test_audit_events_are_valid_r4() -> None:
    record = AuditRecord(
        subtype="read",
        entities=["Observation/1/_history/2"],
        records=["session/S-1"],
        patients=["p1"],
        query="code=x",
        client_id="ehr",
        request_id="r1",
        address="127.0.0.1",
        outcome="4",
        description="missing scope system/Observation.r",
    )
    event = audit_event(record, now=datetime(2026, 12, 1, tzinfo=UTC))
    assert_valid_r4(event)
    assert event["action"] == "R"
    assert event["agent"][0]["who"]["identifier"]["value"] == "ehr"
    intake = audit_event(
        AuditRecord(subtype="import", records=["patient/P-1"]), now=datetime.now(UTC)
    )
    assert_valid_r4(intake)
    search = audit_event(AuditRecord(subtype="search-type", query=""), now=datetime.now(UTC))
    validator = resource_validator()
    for resource in (event, intake, search):
        assert validator.errors(resource | {"meta": {"versionId": "1"}}) == []


# --- the AuditEvent's index rows ----------------------------------------------------------------

_SUBTYPES = ("read", "vread", "search-type", "create", "transaction", "intake", "sync", "token")
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
)


@settings(max_examples=300, deadline=None)
@given(
    subtype=st.sampled_from(_SUBTYPES),
    outcome=st.sampled_from(("0", "4", "8")),
    entities=st.lists(_REFERENCES, max_size=4),
    records=st.lists(st.builds("session/{}".format, st.text(min_size=1, max_size=20)), max_size=2),
    patients=st.lists(st.from_regex(r"[a-z0-9\-]{1,64}", fullmatch=True), max_size=3),
    query=st.none() | st.text(max_size=300),
    description=st.none() | st.text(max_size=600),
    address=st.none() | st.text(min_size=1, max_size=300),
    request_id=st.none() | st.text(min_size=1, max_size=40),
)
def test_audit_event_index_rows_are_what_the_generic_extraction_gives(
    subtype: str,
    outcome: str,
    entities: list[str],
    records: list[str],
    patients: list[str],
    query: str | None,
    description: str | None,
    address: str | None,
    request_id: str | None,
) -> None:
    record = AuditRecord(
        subtype=subtype,
        outcome=outcome,
        entities=entities,
        records=records,
        patients=patients,
        query=query,
        description=description,
        client_id="c-1",
        request_id=request_id,
        address=address,
    )
    event = audit_event(record, now=datetime.now(UTC))
    resource = event | {"meta": {"versionId": "1", "lastUpdated": "2026-12-01T10:00:00+00:00"}}
    generic = extract(resource)
    fast = audit_index_rows(resource)
    assert set(fast.strings) == set(generic.strings)
    assert set(fast.tokens) == set(generic.tokens)
    assert set(fast.dates) == set(generic.dates)
    assert set(fast.references) == set(generic.references)
    assert not generic.quantities
    assert len(fast.tokens) == len(set(fast.tokens))  # no duplicate rows
