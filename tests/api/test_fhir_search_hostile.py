"""Hostile search requests: whatever the parameters, the facade answers a Bundle or a 4xx
OperationOutcome, never a 500 (SQLite; the SQL is the same on PostgreSQL)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

from service.app import create_app
from service.bootstrap import bootstrap
from service.config import Settings
from service.fhir.search_parameters import definitions
from tests.factory import clinic, path_of

TYPES = ("Observation", "Patient", "CarePlan", "Encounter")
NAMES = sorted(
    {code for t in TYPES for code in definitions().by_type[t]}
    | {"_sort", "_count", "_include", "_revinclude", "_summary", "_elements", "_total", "_page"}
)
MODIFIERS = ("", ":exact", ":contains", ":missing", ":not", ":text", ":Patient", ":below", ":x")
PREFIXES = ("", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap", "zz")

values = st.one_of(
    st.text(max_size=40),
    st.builds(lambda p, d: p + d, st.sampled_from(PREFIXES), st.dates().map(str)),
    st.builds(lambda p, n: f"{p}{n}", st.sampled_from(PREFIXES), st.floats(allow_nan=True)),
    st.sampled_from(["true", "false", "|", "a|b|c", "Patient/", "Patient/x", "-1", "1e999", ","]),
)
names = st.one_of(
    st.builds(lambda n, m: n + m, st.sampled_from(NAMES), st.sampled_from(MODIFIERS)),
    st.builds(
        lambda n, c: f"{n}.{c}", st.sampled_from(["subject", "patient", "x"]), st.text(max_size=10)
    ),
    st.builds(
        lambda t, r, c: f"_has:{t}:{r}:{c}",
        st.text(max_size=10),
        st.text(max_size=8),
        st.text(max_size=8),
    ),
    st.text(max_size=20),
)


@pytest.fixture(scope="module")
def client(sqlite_url: str) -> Iterator[TestClient]:
    services = bootstrap(Settings(database_url=sqlite_url))
    with TestClient(create_app(services), raise_server_exceptions=False) as test_client:
        for record in clinic().records():
            test_client.put(path_of(record), json=record)
        yield test_client


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    resource_type=st.sampled_from(TYPES),
    params=st.lists(st.tuples(names, values), min_size=1, max_size=4),
    strict=st.booleans(),
)
def test_no_search_is_a_server_error(
    client: TestClient, resource_type: str, params: list[tuple[str, str]], strict: bool
) -> None:
    query = "&".join(f"{quote(n, safe=':._|')}={quote(v, safe=':|,/')}" for n, v in params)
    headers = {"Prefer": "handling=strict"} if strict else {}
    response = client.get(f"/fhir/{resource_type}?{query}", headers=headers)
    assert response.status_code in (200, 400, 404), (query, response.text)
    body = response.json()
    expected = "Bundle" if response.status_code == 200 else "OperationOutcome"
    assert body["resourceType"] == expected, (query, body)
