"""Real processes: racing If-Match updates, kill -9 during a transaction Bundle, and a server with
authentication on as production runs it (a client registered by the CLI, a token over HTTP)."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, cli, server_env
from tests.factory import clinic, path_of
from tests.smart import ClientKey, token_form

pytestmark = pytest.mark.e2e
FHIR = {"Content-Type": "application/fhir+json"}


def goal(patient_id: str, marker: str, text: str = "walk daily") -> dict[str, Any]:
    return {
        "resourceType": "Goal",
        "identifier": [{"system": "urn:test:crash", "value": marker}],
        "lifecycleStatus": "proposed",
        "description": {"text": text},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def patient_on(client: httpx.Client) -> str:
    record = clinic().patient
    assert client.put(path_of(record), json=record).status_code == 201
    found = client.get(f"/fhir/Patient?identifier={record['mrn']}").json()
    if found.get("entry"):
        return str(found["entry"][0]["resource"]["id"])
    from mappings.context import resource_id

    return resource_id("patient", record["external_id"])


def test_racing_updates_with_if_match_exactly_one_wins(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        patient_id = patient_on(client)
        marker = uuid.uuid4().hex
        created = client.post("/fhir/Goal", json=goal(patient_id, marker), headers=FHIR)
        assert created.status_code == 201, created.text
        goal_id = created.json()["id"]

    def update(n: int) -> int:
        body = goal(patient_id, marker, f"attempt {n}") | {"id": goal_id}
        with httpx.Client(base_url=server.base_url, timeout=30) as own:
            answer = own.put(
                f"/fhir/Goal/{goal_id}", json=body, headers=FHIR | {"If-Match": 'W/"1"'}
            )
            return answer.status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(update, range(16)))
    assert sorted(codes) == [200] + [412] * 15, codes
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        final = client.get(f"/fhir/Goal/{goal_id}")
        assert final.headers["etag"] == 'W/"2"'
        assert client.get(f"/fhir/Goal/{goal_id}/_history/3").status_code == 404


def count_marked(client: httpx.Client, marker: str) -> int:
    found = client.get(f"/fhir/Goal?identifier=urn:test:crash|{marker}&_count=0&_total=accurate")
    assert found.status_code == 200, found.text
    return int(found.json()["total"])


def test_kill_during_a_transaction_leaves_all_of_it_or_none(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        patient_id = patient_on(client)
    entries = 300
    outcomes = []
    rng = random.Random(7)
    for attempt in range(3):
        marker = uuid.uuid4().hex
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": goal(patient_id, marker, f"goal {i}"),
                    "request": {"method": "POST", "url": "Goal"},
                }
                for i in range(entries)
            ],
        }
        answer: dict[str, int] = {}

        def send(bundle: dict[str, Any] = bundle, answer: dict[str, int] = answer) -> None:
            try:
                with httpx.Client(base_url=server.base_url, timeout=120) as own:
                    answer["status"] = own.post("/fhir", json=bundle, headers=FHIR).status_code
            except httpx.TransportError:
                answer["status"] = 0

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.05 + rng.random() * (0.6 if attempt < 2 else 2.0))
        server.kill()
        sender.join(60)
        server.start()
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            stored = count_marked(client, marker)
        assert stored in (0, entries), (attempt, stored)
        if answer.get("status") == 200:
            assert stored == entries  # acknowledged: every entry is there
        outcomes.append((answer.get("status"), stored))
    assert outcomes


# --- authentication on, over a real socket ------------------------------------------------------


@pytest.fixture
def secure_server(e2e_database_url: str, tmp_path: Path) -> Any:
    env = server_env(e2e_database_url, AUTH_DISABLED="false", IMPORT_BATCH_SIZE="50")
    cli("migrate", env=env)
    running = Server(env=env)
    running.start()
    yield running
    running.stop()


def test_a_client_registered_by_the_cli_gets_a_token_and_uses_it(
    secure_server: Server, tmp_path: Path
) -> None:
    key = ClientKey(alg="RS384")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(key.jwks))
    client_id = f"ehr-{uuid.uuid4().hex[:8]}"
    env = secure_server.env
    added = cli(
        "clients",
        "add",
        client_id,
        "--jwks",
        str(jwks),
        "--scope",
        "system/Patient.rs system/intake.write",
        env=env,
    )
    assert client_id in added.stdout
    assert client_id in cli("clients", "list", env=env).stdout
    token_url = f"{secure_server.base_url}/auth/token"
    with httpx.Client(base_url=secure_server.base_url, timeout=30) as http:
        assert http.get("/fhir/Patient").status_code == 401
        discovery = http.get("/fhir/.well-known/smart-configuration").json()
        assert discovery["token_endpoint"] == token_url
        form = token_form(key.assertion(client_id, token_url), "system/Patient.rs")
        issued = http.post("/auth/token", data=form)
        assert issued.status_code == 200, issued.text
        replay = http.post("/auth/token", data=form)
        assert replay.status_code == 401
        bearer = {"Authorization": f"Bearer {issued.json()['access_token']}"}
        assert http.get("/fhir/Patient?_count=1", headers=bearer).status_code == 200
        assert http.get("/fhir/Observation", headers=bearer).status_code == 403
        assert cli("clients", "remove", client_id, env=env).returncode == 0
        again = http.post(
            "/auth/token", data=token_form(key.assertion(client_id, token_url), "system/Patient.rs")
        )
        assert again.status_code == 401


def test_serve_refuses_auth_disabled_off_loopback(e2e_database_url: str) -> None:
    env = server_env(e2e_database_url, AUTH_DISABLED="true")
    refused = cli("serve", "--host", "0.0.0.0", "--port", "1", env=env, check=False)
    assert refused.returncode == 2
    assert "loopback" in refused.stderr
