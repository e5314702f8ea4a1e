"""SMART Backend Services, scopes on every interaction, audit and limits, through the ASGI app.

Clients are built here the way a hospital's would be (their own keys, assertions signed with
PyJWT), never through the server's own helpers.
"""

from __future__ import annotations

import base64
import time
import uuid
import warnings
from typing import Any

import httpx
import jwt
import orjson
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

from mappings.context import resource_id
from service.app import create_app
from service.bootstrap import bootstrap
from service.config import Settings
from tests.api.conftest import TOKEN_URL, SecureApi, secure_settings
from tests.factory import clinic
from tests.factory import path_of as url
from tests.fhir_check import assert_valid_r4
from tests.smart import ClientKey, token_form

INTAKE = "system/intake.read system/intake.write"


def oauth_error(response: httpx.Response, error: str) -> None:
    assert response.status_code in (400, 401), response.text
    assert response.json()["error"] == error, response.text
    assert response.headers["cache-control"] == "no-store"


def load_patient(secure: SecureApi) -> tuple[dict[str, Any], str]:
    """A patient written through the intake API; (record, its FHIR Patient id)."""
    patient = clinic().patient
    written = secure.http.put(url(patient), json=patient, headers=secure.headers(INTAKE))
    assert written.status_code == 201, written.text
    return patient, resource_id("patient", patient["external_id"])


# --- the token endpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_a_registered_client_gets_a_short_lived_token_with_its_scopes(
    secure: SecureApi, alg: str
) -> None:
    key = ClientKey(alg=alg)
    client_id = secure.register("system/Patient.rs system/Observation.read", key=key)
    form = token_form(key.assertion(client_id, TOKEN_URL), "system/Patient.rs system/Goal.rs")
    answer = secure.http.post("/auth/token", data=form)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "bearer"
    assert body["scope"] == "system/Patient.rs"  # Goal was never the client's to have
    assert 0 < body["expires_in"] <= 300
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == client_id
    assert claims["exp"] - time.time() <= 300
    assert answer.headers["cache-control"] == "no-store"


def test_assertions_are_checked_as_the_spec_requires(secure: SecureApi) -> None:
    key = ClientKey()
    client_id = secure.register("system/Patient.rs", key=key)
    scope = "system/Patient.rs"

    def ask(assertion: str, **form: str) -> httpx.Response:
        return secure.http.post("/auth/token", data=token_form(assertion, scope) | form)

    now = int(time.time())
    oauth_error(ask(key.assertion(client_id, "https://elsewhere/token")), "invalid_client")
    oauth_error(ask(key.assertion(client_id, TOKEN_URL, exp=now - 120)), "invalid_client")
    oauth_error(ask(key.assertion(client_id, TOKEN_URL, exp=now + 900)), "invalid_client")
    oauth_error(ask(key.assertion(client_id, TOKEN_URL, sub="someone-else")), "invalid_client")
    oauth_error(ask(key.assertion(client_id, TOKEN_URL, jti=None)), "invalid_client")
    oauth_error(ask(key.assertion(client_id, TOKEN_URL, kid="unknown-kid")), "invalid_client")
    oauth_error(ask(key.assertion("no-such-client", TOKEN_URL)), "invalid_client")
    forger = ClientKey(kid=key.kid)  # the right kid, the wrong key
    oauth_error(ask(forger.assertion(client_id, TOKEN_URL)), "invalid_client")
    hmac = jwt.encode(
        {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": now + 60, "jti": "x"},
        "a-shared-secret-of-thirty-two-bytes!",
        algorithm="HS256",
        headers={"kid": key.kid},
    )
    oauth_error(ask(hmac), "invalid_client")
    unsigned = jwt.encode(
        {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": now + 60, "jti": "y"},
        None,
        algorithm="none",
    )
    oauth_error(ask(unsigned), "invalid_client")
    oauth_error(ask("not a jwt"), "invalid_client")
    oauth_error(
        ask(key.assertion(client_id, TOKEN_URL), grant_type="password"), "unsupported_grant_type"
    )
    oauth_error(
        ask(key.assertion(client_id, TOKEN_URL), client_assertion_type="x"), "invalid_request"
    )
    oauth_error(
        ask(key.assertion(client_id, TOKEN_URL), scope="system/Patient.xyz"), "invalid_scope"
    )
    oauth_error(ask(key.assertion(client_id, TOKEN_URL), scope="system/Goal.rs"), "invalid_scope")


def test_an_assertion_is_accepted_once(secure: SecureApi) -> None:
    key = ClientKey()
    client_id = secure.register("system/Patient.rs", key=key)
    assertion = key.assertion(client_id, TOKEN_URL)
    form = token_form(assertion, "system/Patient.rs")
    assert secure.http.post("/auth/token", data=form).status_code == 200
    oauth_error(secure.http.post("/auth/token", data=form), "invalid_client")


def test_a_replay_is_refused_by_another_process_too(database_url: str) -> None:
    """Two apps on one database (as two processes): the second sees the first's jti."""
    key = ClientKey()
    apps = [bootstrap(secure_settings(database_url)) for _ in range(2)]
    client_id = f"client-{uuid.uuid4().hex[:8]}"
    apps[0].security.clients.add(client_id=client_id, scope="system/Patient.rs", jwks=key.jwks)
    form = token_form(key.assertion(client_id, TOKEN_URL), "system/Patient.rs")
    with TestClient(create_app(apps[0])) as one, TestClient(create_app(apps[1])) as two:
        assert one.post("/auth/token", data=form).status_code == 200
        oauth_error(two.post("/auth/token", data=form), "invalid_client")
        # and the token one process issued is good in the other
        token = one.post(
            "/auth/token",
            data=token_form(key.assertion(client_id, TOKEN_URL), "system/Patient.rs"),
        ).json()["access_token"]
        read = two.get("/fhir/Patient?_count=1", headers={"Authorization": f"Bearer {token}"})
        assert read.status_code == 200, read.text


def test_smart_discovery_describes_the_token_endpoint(secure: SecureApi) -> None:
    found = secure.http.get("/fhir/.well-known/smart-configuration")
    assert found.status_code == 200
    document = found.json()
    assert document["token_endpoint"] == TOKEN_URL
    assert document["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(document["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert "client_credentials" in document["grant_types_supported"]
    assert "system/AuditEvent.rs" in document["scopes_supported"]
    keys = secure.http.get("/auth/jwks").json()["keys"]
    assert keys[0]["alg"] == "RS384"
    statement = secure.http.get("/fhir/metadata").json()
    security = statement["rest"][0]["security"]
    assert security["extension"][0]["extension"] == [{"url": "token", "valueUri": TOKEN_URL}]
    assert_valid_r4(statement)


# --- bearer tokens ----------------------------------------------------------------------------


def test_missing_bad_forged_and_expired_tokens_are_401(secure: SecureApi) -> None:
    def status(token: str | None, path: str = "/fhir/Patient?_count=1") -> httpx.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return secure.http.get(path, headers=headers)

    missing = status(None)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["resourceType"] == "OperationOutcome"
    assert status(None, "/api/v1/patients").headers["content-type"] == "application/problem+json"
    good = secure.token("system/Patient.rs")
    assert status(good).status_code == 200
    claims = jwt.decode(good, options={"verify_signature": False})
    forger = ClientKey(alg="RS384", kid=jwt.get_unverified_header(good)["kid"])
    forged = jwt.encode(
        claims | {"scope": "system/*.cruds"},
        forger.private,
        algorithm="RS384",
        headers={"kid": forger.kid},
    )
    for bad in ("garbage", good[:-4] + "AAAA", forged):
        refused = status(bad)
        assert refused.status_code == 401, bad
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    basic = secure.http.get("/fhir/Patient", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401


def test_an_expired_token_is_refused(database_url: str) -> None:
    services = bootstrap(secure_settings(database_url, auth_token_lifetime_seconds=30))
    services.security.tokens.lifetime_seconds = -60  # already past the clock skew allowed
    token = services.security.tokens.access_token(client_id="c", scope="system/Patient.rs")
    with TestClient(create_app(services)) as http:
        refused = http.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401
    assert "expired" in refused.headers["www-authenticate"]


def test_tokens_of_a_trusted_external_issuer_are_accepted(database_url: str) -> None:
    issuer_key = ClientKey(alg="RS384")
    jwks_url = "https://idp.example.org/jwks"

    def serve(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == jwks_url
        return httpx.Response(200, json=issuer_key.jwks)

    settings = secure_settings(
        database_url,
        auth_external_issuer="https://idp.example.org",
        auth_external_jwks_url=jwks_url,
        auth_external_audience="https://bridge.example.org/fhir",
    )
    services = bootstrap(settings, http=httpx.Client(transport=httpx.MockTransport(serve)))
    now = int(time.time())
    claims = {
        "iss": "https://idp.example.org",
        "sub": "ehr-1",
        "aud": "https://bridge.example.org/fhir",
        "exp": now + 120,
        "scope": "system/Patient.rs",
    }

    def token(**changes: Any) -> str:
        return jwt.encode(
            claims | changes, issuer_key.private, algorithm="RS384", headers={"kid": issuer_key.kid}
        )

    with TestClient(create_app(services)) as http:

        def get(value: str, path: str = "/fhir/Patient") -> int:
            return http.get(path, headers={"Authorization": f"Bearer {value}"}).status_code

        assert get(token()) == 200
        assert get(token(), "/fhir/Observation") == 403
        assert get(token(aud="https://someone-else")) == 401
        assert get(token(exp=now - 600)) == 401
        assert get(token(iss="https://untrusted.example.org")) == 401


# --- scopes per interaction ---------------------------------------------------------------------


def test_each_interaction_needs_its_scope(secure: SecureApi) -> None:
    _, patient_id = load_patient(secure)
    read = f"/fhir/Patient/{patient_id}"

    def code(method: str, path: str, scope: str, **kwargs: Any) -> int:
        headers = secure.headers(scope) | kwargs.pop("headers", {})
        return secure.http.request(method, path, headers=headers, **kwargs).status_code

    assert code("GET", read, "system/Patient.r") == 200
    assert code("GET", read, "system/Patient.read") == 200  # v1
    assert code("GET", read, "system/*.read") == 200
    assert code("GET", read, "system/Patient.s") == 403
    assert code("GET", read, "system/Observation.rs") == 403
    assert code("GET", read + "/_history/1", "system/Patient.r") == 200
    assert code("GET", read + "/_history/1", "system/Patient.s") == 403
    assert code("GET", read + "/_history", "system/Patient.r") == 200
    assert code("GET", "/fhir/Patient", "system/Patient.s") == 200
    assert code("GET", "/fhir/Patient", "system/Patient.r") == 403
    assert code("GET", "/fhir/Patient/_history", "system/Patient.s") == 200
    assert (
        code(
            "POST",
            "/fhir/Patient/_search",
            "system/Patient.s",
            content=b"_count=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        == 200
    )
    assert (
        code(
            "POST",
            "/fhir/Patient/_search",
            "system/Patient.s",
            content=b"_revinclude=Observation:subject",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        == 403
    )
    assert code("GET", "/fhir/Patient?_revinclude=Observation:subject", "system/Patient.s") == 403
    assert (
        code(
            "GET",
            "/fhir/Patient?_revinclude=Observation:subject",
            "system/Patient.s system/Observation.r",
        )
        == 200
    )
    assert (
        code("GET", "/fhir/Observation?_include=Observation:subject", "system/Observation.s") == 403
    )
    assert code("GET", "/fhir/Observation?subject:Patient.name=x", "system/Observation.s") == 403
    assert code("GET", "/fhir/Patient?_has:Observation:subject:code=x", "system/Patient.s") == 403
    # writes: c, u, d; a delete of a record-backed type is refused (405) once allowed
    goal = {
        "resourceType": "Goal",
        "lifecycleStatus": "proposed",
        "description": {"text": "walk"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    fhir = {"Content-Type": "application/fhir+json"}
    assert code("POST", "/fhir/Goal", "system/Goal.rs", json=goal, headers=fhir) == 403
    assert code("POST", "/fhir/Goal", "system/Goal.read", json=goal, headers=fhir) == 403
    assert (
        code("PUT", "/fhir/Goal/g1", "system/Goal.c", json=goal | {"id": "g1"}, headers=fhir) == 403
    )
    assert code("DELETE", "/fhir/Goal/g1", "system/Goal.cru") == 403
    assert code("DELETE", "/fhir/Goal?patient=x", "system/Goal.d") == 403  # conditional: s too
    assert (
        code(
            "PATCH",
            read,
            "system/Patient.rs",
            json=[],
            headers={"Content-Type": "application/json-patch+json"},
        )
        == 403
    )
    # the intake API has scopes of its own; a FHIR wildcard does not reach it
    assert code("GET", "/api/v1/patients", "system/*.cruds") == 403
    assert code("GET", "/api/v1/patients", "system/intake.read") == 200
    patient = clinic().patient
    assert code("PUT", url(patient), "system/intake.read", json=patient) == 403
    assert code("POST", "/api/v1/import", "system/intake.read", content=b"{}") == 403
    assert code("GET", "/api/v1/sync/status", "system/intake.read") == 403


def test_export_and_everything_need_read_on_every_type_they_return(secure: SecureApi) -> None:
    _, patient_id = load_patient(secure)
    async_ = {"Prefer": "respond-async"}

    def code(path: str, scope: str) -> int:
        return secure.http.get(path, headers=secure.headers(scope) | async_).status_code

    assert code("/fhir/$export", "system/Patient.rs") == 403
    assert code("/fhir/$export?_type=Patient", "system/Patient.rs") == 202
    assert code("/fhir/$export", "system/*.read") == 202  # all but the audit trail
    assert code("/fhir/$export?_type=AuditEvent", "system/*.read") == 403
    assert code("/fhir/Patient/$export?_type=Patient,Observation", "system/Patient.rs") == 403
    everything = f"/fhir/Patient/{patient_id}/$everything"
    assert code(everything, "system/Patient.rs") == 403
    assert code(everything + "?_type=Patient", "system/Patient.rs") == 200
    assert code(everything, "system/*.read") == 200


def test_an_export_job_is_seen_only_by_the_client_that_started_it(secure: SecureApi) -> None:
    load_patient(secure)
    owner = secure.headers("system/Patient.rs")  # one client's token, reused
    other = secure.headers("system/Patient.rs")  # another client, with the same scopes
    kicked = secure.http.get(
        "/fhir/$export?_type=Patient", headers=owner | {"Prefer": "respond-async"}
    )
    assert kicked.status_code == 202, kicked.text
    status_url = kicked.headers["content-location"].removeprefix("http://testserver")
    job_id = status_url.rsplit("/", 1)[1]
    deadline = time.monotonic() + 30
    while (mine := secure.http.get(status_url, headers=owner)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert mine.status_code == 200, mine.text
    (output,) = mine.json()["output"]
    file_url = output["url"].removeprefix("http://testserver")
    assert secure.http.get(file_url, headers=owner).status_code == 200
    not_found = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "not-found",
                "diagnostics": f"there is no export job {job_id}",
            }
        ],
    }
    theirs = secure.http.get(status_url, headers=other)
    assert (theirs.status_code, theirs.json()) == (404, not_found)
    assert secure.http.get(file_url, headers=other).status_code == 404
    assert secure.http.delete(status_url, headers=other).status_code == 404
    assert secure.http.get(status_url, headers=owner).status_code == 200  # still there
    assert secure.http.delete(status_url, headers=owner).status_code == 202


def test_transaction_entries_are_checked_one_by_one(secure: SecureApi) -> None:
    _, patient_id = load_patient(secure)
    goal = {
        "resourceType": "Goal",
        "lifecycleStatus": "proposed",
        "description": {"text": "walk"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": goal, "request": {"method": "POST", "url": "Goal"}},
            {"request": {"method": "GET", "url": f"Patient/{patient_id}"}},
        ],
    }
    headers = {"Content-Type": "application/fhir+json"}
    refused = secure.http.post(
        "/fhir", json=bundle, headers=headers | secure.headers("system/Goal.c")
    )
    assert refused.status_code == 403
    assert "entry 1" in refused.json()["issue"][0]["diagnostics"]
    done = secure.http.post(
        "/fhir", json=bundle, headers=headers | secure.headers("system/Goal.c system/Patient.r")
    )
    assert done.status_code == 200, done.text


def test_the_audit_trail_needs_its_own_scope_and_cannot_be_written(secure: SecureApi) -> None:
    assert (
        secure.http.get("/fhir/AuditEvent", headers=secure.headers("system/*.cruds")).status_code
        == 403
    )
    found = secure.http.get("/fhir/AuditEvent", headers=secure.headers("system/AuditEvent.rs"))
    assert found.status_code == 200
    written = secure.http.post(
        "/fhir/AuditEvent",
        json={"resourceType": "AuditEvent"},
        headers=secure.headers("system/AuditEvent.cruds")
        | {"Content-Type": "application/fhir+json"},
    )
    assert written.status_code == 405


# --- audit ------------------------------------------------------------------------------------


def audit_events(secure: SecureApi, query: str) -> list[dict[str, Any]]:
    # Reads are audited by the group commit after their answer (AUDIT_READS=async): let it run.
    deadline = time.monotonic() + 5
    while secure.services.security.audit.queued and time.monotonic() < deadline:
        time.sleep(0.01)
    found = secure.http.get(
        f"/fhir/AuditEvent?{query}&_count=100", headers=secure.headers("system/AuditEvent.rs")
    )
    assert found.status_code == 200, found.text
    return [entry["resource"] for entry in found.json().get("entry", [])]


def agent_of(event: dict[str, Any]) -> str:
    return str(event["agent"][0]["who"]["identifier"]["value"])


def test_reads_writes_and_refusals_are_audited_with_who_what_and_which_patient(
    secure: SecureApi,
) -> None:
    key = ClientKey()
    client_id = secure.register("system/Patient.rs system/intake.write", key=key)
    token = secure.http.post(
        "/auth/token",
        data=token_form(
            key.assertion(client_id, TOKEN_URL), "system/Patient.rs system/intake.write"
        ),
    ).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}", "X-Request-ID": f"req-{uuid.uuid4().hex[:8]}"}
    patient = clinic().patient
    assert secure.http.put(url(patient), json=patient, headers=auth).status_code == 201
    patient_id = resource_id("patient", patient["external_id"])
    assert secure.http.get(f"/fhir/Patient/{patient_id}", headers=auth).status_code == 200
    assert secure.http.get(f"/fhir/Patient?_id={patient_id}", headers=auth).status_code == 200
    assert secure.http.get("/fhir/Observation", headers=auth).status_code == 403
    events = audit_events(secure, f"patient=Patient/{patient_id}")
    mine = [e for e in events if agent_of(e) == client_id]
    kinds = sorted(e["subtype"][0]["code"] for e in mine)
    assert kinds == ["intake", "read", "search-type"], kinds
    by_kind = {e["subtype"][0]["code"]: e for e in mine}
    assert by_kind["intake"]["action"] == "U"
    assert by_kind["read"]["action"] == "R"
    assert all(e["outcome"] == "0" for e in mine)
    details = [d for e in mine for ent in e["entity"] for d in ent.get("detail", [])]
    assert {d["valueString"] for d in details} == {auth["X-Request-ID"]}
    recent = audit_events(secure, "outcome=4&_sort=-_lastUpdated")
    refused = [e for e in recent if agent_of(e) == client_id]
    assert len(refused) == 1
    assert "system/Observation.s" in refused[0]["outcomeDesc"]
    search = by_kind["search-type"]
    query = next(ent["query"] for ent in search["entity"] if "query" in ent)
    assert base64.b64decode(query).decode() == f"_id={patient_id}"


def test_a_facade_write_and_its_audit_commit_together(secure: SecureApi) -> None:
    _, patient_id = load_patient(secure)
    goal = {
        "resourceType": "Goal",
        "lifecycleStatus": "proposed",
        "description": {"text": "walk"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    headers = secure.headers("system/Goal.c") | {"Content-Type": "application/fhir+json"}
    created = secure.http.post("/fhir/Goal", json=goal, headers=headers)
    assert created.status_code == 201, created.text
    goal_id = created.json()["id"]
    events = audit_events(secure, f"entity=Goal/{goal_id}/_history/1")
    assert [e["subtype"][0]["code"] for e in events] == ["create"]
    assert events[0]["action"] == "C"
    # a refused write leaves its refusal, not a success
    bad = secure.http.post(
        "/fhir/Goal", json=goal | {"lifecycleStatus": "nonsense"}, headers=headers
    )
    assert bad.status_code in (400, 422)


def test_logs_carry_request_ids_not_patient_data(
    secure: SecureApi, caplog: pytest.LogCaptureFixture
) -> None:
    patient = clinic().patient
    caplog.set_level("DEBUG")
    headers = secure.headers(INTAKE + " system/Patient.rs")
    secure.http.put(url(patient), json=patient, headers=headers)
    family = patient["name"]["family"]
    secure.http.get(f"/fhir/Patient?family={family}", headers=headers)
    secure.http.get(f"/api/v1/patients/{patient['external_id']}", headers=headers)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("service"))
    assert "request_id=" in text
    for value in (family, patient["external_id"], patient["mrn"], patient["birth_date"]):
        assert value not in text


# --- limits -----------------------------------------------------------------------------------


def test_an_oversized_body_is_413(database_url: str) -> None:
    services = bootstrap(secure_settings(database_url, max_body_bytes=4096))
    with TestClient(create_app(services)) as http:
        big = b'{"resourceType": "Goal", "note": [' + b'{"text": "x"},' * 1000 + b"{}]}"
        refused = http.post(
            "/fhir/Goal", content=big, headers={"Content-Type": "application/fhir+json"}
        )
        assert refused.status_code == 413
        assert refused.json()["resourceType"] == "OperationOutcome"

        def chunks() -> Any:
            yield big[:3000]
            yield big[3000:]

        streamed = http.post("/api/v1/import", content=chunks())
        assert streamed.status_code == 413
        assert streamed.headers["content-type"] == "application/problem+json"


def test_a_client_over_its_rate_is_429_with_retry_after(database_url: str) -> None:
    services = bootstrap(
        secure_settings(database_url, rate_limit_per_minute=60, rate_limit_burst=3)
    )
    with TestClient(create_app(services)) as http:
        api = SecureApi(http=http, services=services)
        headers = api.headers("system/Patient.rs")
        codes = [http.get("/fhir/Patient?_count=1", headers=headers).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200]
        assert codes[3] == 429
        limited = http.get("/fhir/Patient?_count=1", headers=headers)
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["issue"][0]["code"] == "throttled"
        other = api.headers("system/Patient.rs")  # another client has its own budget
        assert http.get("/fhir/Patient?_count=1", headers=other).status_code == 200


# --- secure by default --------------------------------------------------------------------------


def test_authentication_is_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTH_DISABLED", raising=False)
    assert Settings(_env_file=None).auth_disabled is False  # type: ignore[call-arg]


def test_external_issuer_settings_go_together() -> None:
    with pytest.raises(ValueError, match="together"):
        Settings(auth_external_issuer="https://idp.example.org")


def test_jwks_registration_refuses_private_keys(secure: SecureApi) -> None:
    key = ClientKey()
    private = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.private))
    with pytest.raises(ValueError, match="private"):
        secure.services.security.clients.add(
            client_id="leaky", scope="system/Patient.rs", jwks={"keys": [private | {"kid": "k"}]}
        )


def test_a_read_whose_audit_cannot_be_written_is_500_without_its_data(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = bootstrap(secure_settings(database_url, audit_reads="sync"))
    with TestClient(create_app(services)) as http:
        secure = SecureApi(http=http, services=services)
        _, patient_id = load_patient(secure)
        headers = secure.headers("system/Patient.rs")

        def broken(events: list[dict[str, Any]]) -> None:
            raise RuntimeError("the audit store is down")

        monkeypatch.setattr(services.security.audit, "_insert", broken)
        read = http.get(f"/fhir/Patient/{patient_id}", headers=headers)
        assert read.status_code == 500
        assert read.json()["resourceType"] == "OperationOutcome"
        assert patient_id not in read.text.replace(read.headers["x-request-id"], "")
        search = http.get(f"/fhir/Patient?_id={patient_id}", headers=headers)
        assert search.status_code == 500
        assert "entry" not in search.text


def test_queued_read_audits_are_bounded_and_written_once_the_store_is_back(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = bootstrap(secure_settings(database_url))  # AUDIT_READS=async, the default
    writer = services.security.audit
    with TestClient(create_app(services)) as http:
        secure = SecureApi(http=http, services=services)
        _, patient_id = load_patient(secure)
        headers = secure.headers("system/Patient.rs")
        working = writer._insert

        def broken(events: list[dict[str, Any]]) -> None:
            raise RuntimeError("the audit store is down")

        monkeypatch.setattr(writer, "_insert", broken)
        monkeypatch.setattr(writer, "_backlog", 3)
        answered = [http.get(f"/fhir/Patient/{patient_id}", headers=headers) for _ in range(3)]
        assert [r.status_code for r in answered] == [200, 200, 200]
        refused = http.get(f"/fhir/Patient/{patient_id}", headers=headers)  # the queue is full
        assert refused.status_code == 500
        assert patient_id not in refused.text.replace(refused.headers["x-request-id"], "")
        monkeypatch.setattr(writer, "_insert", working)
        reads = [
            e
            for e in audit_events(secure, f"patient=Patient/{patient_id}&subtype=read")
            if e["outcome"] == "0"
        ]
        assert len(reads) == 3


def test_a_read_that_takes_too_long_is_503(database_url: str) -> None:
    services = bootstrap(secure_settings(database_url, request_timeout_seconds=0.000_001))
    with TestClient(create_app(services)) as http:
        api = SecureApi(http=http, services=services)
        slow = http.get("/fhir/Patient?name=x", headers=api.headers("system/Patient.rs"))
    assert slow.status_code == 503
    assert slow.headers["retry-after"]
    assert slow.json()["issue"][0]["code"] == "timeout"


def test_a_client_may_publish_its_keys_at_a_jwks_url(database_url: str) -> None:
    key = ClientKey(alg="ES384")
    fetched: list[str] = []

    def serve(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        return httpx.Response(200, json=key.jwks)

    services = bootstrap(
        secure_settings(database_url), http=httpx.Client(transport=httpx.MockTransport(serve))
    )
    client_id = f"client-{uuid.uuid4().hex[:8]}"
    services.security.clients.add(
        client_id=client_id, scope="system/Patient.rs", jwks_url="https://ehr.example.org/jwks"
    )
    with TestClient(create_app(services)) as http:
        for _ in range(2):
            form = token_form(key.assertion(client_id, TOKEN_URL), "system/Patient.rs")
            assert http.post("/auth/token", data=form).status_code == 200
        rotated = ClientKey(alg="ES384")  # a key the published set does not hold
        form = token_form(rotated.assertion(client_id, TOKEN_URL), "system/Patient.rs")
        oauth_error(http.post("/auth/token", data=form), "invalid_client")
    assert fetched[0] == "https://ehr.example.org/jwks"
    assert len(fetched) <= 2  # cached; an unknown kid refetches at most once
