"""Delivery to EHRs over real sockets: a second Infusion Bridge process as a full EHR, a
restricted EHR (Epic-like), a fault injector between them, SMART Backend Services, care-plan
sync both ways, and kill -9 of the worker mid-delivery, counting what arrives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.app import create_app
from service.bootstrap import Services, bootstrap, ehr_clients
from service.config import Settings
from service.records.service import parse_record, put_record
from service.store.tables import resources as resources_table
from service.store.tables import sync_ledger
from service.sync import ledger
from service.sync.care_plans import CarePlanSync
from service.sync.client import PermanentFailure
from service.sync.destinations import Destination, parse_destinations
from service.sync.outbound import business_identifier
from service.sync.worker import DeliveryWorker, WorkerSettings
from tests import factory
from tests.e2e.conftest import CLI, Server, cli, server_env
from tests.e2e.ehr_servers import FaultProxy, RestrictedEhr, serve_in_thread

pytestmark = pytest.mark.e2e

MATCH = "urn:oid:2.16.840.1.113883.3.7777.1"
EHR_SITE = "http://county-ehr.example/sid"
SITE = "http://infusion-bridge.org/fhir/sid"
FULL_SEND = (
    "[Encounter, MedicationAdministration, Observation, AdverseEvent, QuestionnaireResponse]"
)
FAST = WorkerSettings(retry_base_seconds=0.05, retry_cap_seconds=0.5, idle_seconds=0.05)


@pytest.fixture(scope="module")
def ehr_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Another Infusion Bridge, with identifier systems of its own: a full-featured EHR."""
    url = f"sqlite:///{tmp_path_factory.mktemp('ehr')}/ehr.db"
    env = server_env(url, SITE_IDENTIFIER_SYSTEM=EHR_SITE, MRN_SYSTEM=MATCH, AUTH_DISABLED="true")
    cli("migrate", env=env)
    server = Server(env=env)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def clinic_services(database_url: str) -> Iterator[Services]:
    services = bootstrap(Settings(database_url=database_url, auth_disabled=True))
    yield services
    services.close()


def destination(base: str, *, send: str = FULL_SEND, extra: str = "") -> Destination:
    (found,) = parse_destinations(
        f"""
destinations:
  - name: ehr-{os.urandom(4).hex()}
    base_url: {base}
    send: {send}
    patients: {{match_identifier_system: "{MATCH}"}}
    timeout_seconds: 2
    backfill: false
{extra}
"""
    )
    return found


def register_patient(ehr: Server, value: str) -> None:
    record = {
        "mrn": value,
        "name": {"given": ["Ana"], "family": "Silva"},
        "birth_date": "1984-03-02",
        "sex": "female",
    }
    response = httpx.put(f"{ehr.base_url}/api/v1/patients/EP-{value}", json=record, timeout=30)
    assert response.status_code in (200, 201), response.text


def write_clinic(services: Services, ehr_value: str) -> factory.Clinic:
    clinic = factory.clinic()
    clinic.patient["ehr_identifiers"] = [{"system": MATCH, "value": ehr_value}]
    for record in clinic.records():
        put(services, record)
    return clinic


def put(services: Services, record: dict[str, Any]) -> None:
    with services.database.unit_of_work() as uow:
        put_record(
            uow=uow, record=parse_record(record), materializer=services.materializer, actor="test"
        )


def worker_for(
    services: Services, *destinations: Destination, settings: WorkerSettings = FAST
) -> DeliveryWorker:
    return DeliveryWorker(
        database=services.database,
        destinations=destinations,
        clients=ehr_clients(destinations),
        site_system=SITE,
        settings=settings,
        care_plans=CarePlanSync(database=services.database, materializer=services.materializer),
    )


def refused(services: Services, target: Destination) -> list[dict[str, Any]]:
    """Dead letters other than those of patients (of other tests) this EHR does not know."""
    with services.database.unit_of_work(write=False) as uow:
        dead = ledger.dead_letters(uow.connection, destination=target.name, limit=10_000)
    return [d for d in dead if "no Patient in the EHR" not in (d["error"] or "")]


def status_of(services: Services, target: Destination) -> dict[str, Any]:
    with services.database.unit_of_work(write=False) as uow:
        (row,) = ledger.status(uow.connection, [target], now=datetime.now(UTC))
    return row


def drain(
    worker: DeliveryWorker, services: Services, target: Destination, limit: float = 40
) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        worker.tick()
        planned = target.name in worker.plans  # else the tick did not get to fan out
        if planned and status_of(services, target)["queue_depth"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"not drained: {status_of(services, target)}")


def sent_resources(services: Services, patient_id: str, types: set[str]) -> list[dict[str, Any]]:
    """The clinic's current resources of `types` that belong to the patient."""
    from service.store.resources import patient_of

    with services.database.unit_of_work(write=False) as uow:
        rows = uow.connection.execute(
            select(resources_table.c.body).where(
                resources_table.c.resource_type.in_(sorted(types)),
                resources_table.c.deleted.is_(False),
            )
        )
        bodies = [orjson.loads(row.body) for row in rows]
    return [b for b in bodies if patient_of(b) == patient_id]


def copies_in(base: str, resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The EHR's resources that carry this one's business identifier."""
    identifier = business_identifier(resource, SITE)
    assert identifier is not None
    if resource["resourceType"] == "AdverseEvent":
        # R4 defines no identifier search on AdverseEvent: look at them all.
        bundle = httpx.get(f"{base}/AdverseEvent", params={"_count": "1000"}, timeout=30).json()
        return [
            e["resource"]
            for e in bundle.get("entry", [])
            if e["resource"].get("identifier") == identifier
        ]
    bundle = httpx.get(
        f"{base}/{resource['resourceType']}",
        params={"identifier": f"{identifier['system']}|{identifier['value']}"},
        timeout=30,
    ).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def own_id(clinic: factory.Clinic, kind: str) -> str:
    from mappings.context import resource_id

    return resource_id(kind, getattr(clinic, {"diagnosis": "diagnosis"}[kind])["external_id"])


def audit_events_saying(services: Services, text: str) -> list[dict[str, Any]]:
    """The stored AuditEvents whose JSON contains `text`."""
    with services.database.unit_of_work(write=False) as uow:
        return [
            orjson.loads(body)
            for body in uow.connection.execute(
                select(resources_table.c.body).where(
                    resources_table.c.resource_type == "AuditEvent",
                    resources_table.c.body.contains(text),
                )
            ).scalars()
        ]


def encounter_id(clinic: factory.Clinic) -> str:
    from mappings.encounter import encounter_reference

    return encounter_reference(parse_record(clinic.session))["reference"].split("/")[1]  # type: ignore[arg-type]


def patient_resource_id(clinic: factory.Clinic) -> str:
    from mappings.context import resource_id

    return resource_id("patient", clinic.patient["external_id"])


TYPES = {"Encounter", "MedicationAdministration", "Observation", "AdverseEvent"}


def test_every_change_arrives_once_in_a_full_ehr(
    clinic_services: Services, ehr_server: Server
) -> None:
    value = f"E-{os.urandom(4).hex()}"
    register_patient(ehr_server, value)
    target = destination(f"{ehr_server.base_url}/fhir")
    worker = worker_for(clinic_services, target)
    clinic = write_clinic(clinic_services, value)
    try:
        drain(worker, clinic_services, target)
        assert worker.plans[target.name].of("Observation").value == "transaction"
        ours = sent_resources(clinic_services, patient_resource_id(clinic), TYPES)
        assert len(ours) >= 10
        for resource in ours:
            (copy,) = copies_in(f"{ehr_server.base_url}/fhir", resource)
            subject = copy.get("subject") or copy.get("patient")
            assert subject, copy
            assert subject["reference"] != f"Patient/{patient_resource_id(clinic)}"
            assert copy.get("status") == resource.get("status")
        # A change: the session's dose and a vital sign. Updated in place, nothing duplicated.
        session = clinic.session | {"total_dose_mg": 35.0, "rate_mg_per_hour": 52.5}
        session["vitals"] = [*session["vitals"][:1], {**session["vitals"][1], "heart_rate": 84}]
        put(clinic_services, session)
        drain(worker, clinic_services, target)
        (administration,) = [r for r in ours if r["resourceType"] == "MedicationAdministration"]
        (copy,) = copies_in(f"{ehr_server.base_url}/fhir", administration)
        assert copy["dosage"]["dose"]["value"] == 35.0
        assert copy["meta"]["versionId"] == "2"
        for resource in sent_resources(clinic_services, patient_resource_id(clinic), TYPES):
            assert len(copies_in(f"{ehr_server.base_url}/fhir", resource)) == 1
        status = status_of(clinic_services, target)
        assert refused(clinic_services, target) == []
        assert status["delivered"] >= len(ours)
        assert status["last_success_at"] is not None
    finally:
        worker.close()


def test_faults_are_retried_until_each_change_arrives_once(
    clinic_services: Services, ehr_server: Server
) -> None:
    value = f"E-{os.urandom(4).hex()}"
    register_patient(ehr_server, value)
    proxy = FaultProxy(f"{ehr_server.base_url}/fhir")
    with serve_in_thread(proxy.app) as proxy_base:
        target = destination(proxy_base)
        worker = worker_for(clinic_services, target)
        try:
            worker.plan_for(target)  # the CapabilityStatement, before the faults
            proxy.faults.extend(
                ["500", "429:1", "drop", "drop-after", "timeout:3", "slow:0.3", "503", "drop-after"]
            )
            clinic = write_clinic(clinic_services, value)
            started = time.monotonic()
            drain(worker, clinic_services, target, limit=60)
            assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured
            assert not proxy.faults, "every fault was injected"
        finally:
            worker.close()
    ours = sent_resources(clinic_services, patient_resource_id(clinic), TYPES)
    for resource in ours:
        assert len(copies_in(f"{ehr_server.base_url}/fhir", resource)) == 1
    assert refused(clinic_services, target) == []


def test_a_refused_change_is_a_dead_letter_with_the_ehrs_outcome(
    clinic_services: Services, ehr_server: Server
) -> None:
    value = f"E-{os.urandom(4).hex()}"
    register_patient(ehr_server, value)
    # The EHR keeps Conditions as its own records: ours are refused with a 422.
    target = destination(f"{ehr_server.base_url}/fhir", send="[Condition, Encounter]")
    worker = worker_for(clinic_services, target)
    clinic = write_clinic(clinic_services, value)
    try:
        drain(worker, clinic_services, target)
    finally:
        worker.close()
    with clinic_services.database.unit_of_work(write=False) as uow:
        dead = ledger.dead_letters(uow.connection, destination=target.name, limit=1000)
    (letter,) = [d for d in dead if d["resource"] == f"Condition/{own_id(clinic, 'diagnosis')}"]
    assert letter["resource"].startswith("Condition/")
    assert letter["outcome"]["resourceType"] == "OperationOutcome"
    assert letter["outcome"]["issue"][0]["expression"] == ["Condition.identifier"]
    assert status_of(clinic_services, target)["delivered"] >= 1  # the Encounter went


def test_a_patient_the_ehr_does_not_know_waits_as_dead_letters_and_can_be_retried(
    clinic_services: Services, ehr_server: Server
) -> None:
    value = f"E-{os.urandom(4).hex()}"
    target = destination(f"{ehr_server.base_url}/fhir", send="[Encounter]")
    worker = worker_for(clinic_services, target)
    clinic = write_clinic(clinic_services, value)
    try:
        drain(worker, clinic_services, target)
        with clinic_services.database.unit_of_work(write=False) as uow:
            dead = ledger.dead_letters(uow.connection, destination=target.name, limit=1000)
        (letter,) = [d for d in dead if d["resource"] == f"Encounter/{encounter_id(clinic)}"]
        assert "no Patient in the EHR" in letter["error"]
        register_patient(ehr_server, value)
        with clinic_services.database.unit_of_work() as uow:
            assert ledger.retry_dead(uow.connection, letter["id"], now=datetime.now(UTC))
            uow.commit()
        drain(worker, clinic_services, target)
        with clinic_services.database.unit_of_work(write=False) as uow:
            assert ledger.delivery(uow.connection, letter["id"])["status"] == "delivered"
    finally:
        worker.close()


def _restricted_setup(
    clinic_services: Services, ehr: RestrictedEhr, *, with_encounter: bool
) -> factory.Clinic:
    value = f"E-{os.urandom(4).hex()}"
    patient = ehr.add(
        {"resourceType": "Patient", "identifier": [{"system": MATCH, "value": value}]}
    )
    if with_encounter:
        ehr.add(
            {
                "resourceType": "Encounter",
                "status": "finished",
                "subject": {"reference": f"Patient/{patient['id']}"},
                "period": {"start": "2026-10-05T09:00:00-04:00"},
            }
        )
    return write_clinic(clinic_services, value)


@pytest.mark.parametrize("with_encounter", [True, False])
def test_a_restricted_ehr_gets_vitals_on_its_encounter_and_a_summary_for_the_rest(
    clinic_services: Services, with_encounter: bool
) -> None:
    ehr = RestrictedEhr()
    with serve_in_thread(ehr.app) as base:
        ehr.base = base
        target = destination(
            base, send="[Encounter, MedicationAdministration, Observation, CarePlan]"
        )
        worker = worker_for(clinic_services, target)
        try:
            _restricted_setup(clinic_services, ehr, with_encounter=with_encounter)
            drain(worker, clinic_services, target)
            assert worker.plans[target.name].as_json() == {
                "CarePlan": "unsupported",
                "Encounter": "unsupported",
                "MedicationAdministration": "document-reference",
                "Observation": "ledger",
            }
            drain(worker, clinic_services, target)  # nothing more to send
        finally:
            worker.close()
    (document,) = ehr.of("DocumentReference")
    import base64

    text = base64.b64decode(document["content"][0]["attachment"]["data"]).decode()
    assert "Dose: 34 mg IV" in text
    assert "122/78" in text
    assert ehr.creates["DocumentReference"] == 1
    observations = [
        o for o in ehr.of("Observation") if "vital-signs" in orjson.dumps(o["category"]).decode()
    ]
    if with_encounter:
        (encounter,) = ehr.of("Encounter")
        assert observations
        assert {o["encounter"]["reference"] for o in observations} == {
            f"Encounter/{encounter['id']}"
        }
        assert document["context"]["encounter"] == [{"reference": f"Encounter/{encounter['id']}"}]
    else:
        assert observations == []  # no encounter to file them on: they are in the summary
    counts = {}
    for o in observations:
        key = orjson.dumps(o["identifier"])
        counts[key] = counts.get(key, 0) + 1
    assert set(counts.values()) <= {1}
    assert refused(clinic_services, target) == [], [
        (d["error"], d["outcome"]) for d in refused(clinic_services, target)
    ]


def test_smart_backend_services_against_a_token_endpoint_that_checks_the_assertion(
    clinic_services: Services, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ehr = RestrictedEhr(smart=True, public_key=key.public_key(), client_id="infusion-bridge")
    with serve_in_thread(ehr.app) as base:
        ehr.base = base
        target = destination(
            base,
            send="[Observation]",
            extra=f"""    auth: {{type: smart-backend, client_id: infusion-bridge,
           private_key: {tmp_path / "key.pem"},
           scope: "system/Observation.c system/Patient.rs"}}""",
        )
        worker = worker_for(clinic_services, target)
        try:
            _restricted_setup(clinic_services, ehr, with_encounter=True)
            drain(worker, clinic_services, target)
        finally:
            worker.close()
    assert ehr.of("Observation")
    assert ehr.token_requests == 1  # cached across every request


def test_care_plans_sync_both_ways_without_echoes_and_conflicts_are_kept(
    clinic_services: Services,
) -> None:
    ehr = RestrictedEhr(
        writable=frozenset({"CarePlan", "Observation", "DocumentReference"}),
        updatable=frozenset({"CarePlan"}),
    )
    with serve_in_thread(ehr.app) as base:
        ehr.base = base
        target = destination(
            base, send="[CarePlan]", extra="    care_plan_sync: {poll_interval_seconds: 3600}"
        )
        worker = worker_for(clinic_services, target)
        sync = worker.care_plans
        client = worker.clients[target.name]
        try:
            clinic = _restricted_setup(clinic_services, ehr, with_encounter=False)
            drain(worker, clinic_services, target)
            (plan,) = ehr.of("CarePlan")
            # What the worker pushed is not pulled back as new.
            assert sync.poll(target, client) == 0
            # The EHR puts the plan on hold: the course follows, and that is not pushed back.
            ehr.change("CarePlan", plan["id"], status="on-hold")
            updates_before = ehr.updates.get("CarePlan", 0)
            pulled = sync.poll(target, client)
            with clinic_services.database.unit_of_work(write=False) as uow:
                assert pulled == 1, [
                    (c["field"], c["ehr_value"])
                    for c in ledger.conflicts(uow.connection, state=None)[-3:]
                ]
            with clinic_services.database.unit_of_work(write=False) as uow:
                from service.records.repository import RecordRepository

                stored = RecordRepository(uow.connection).get(
                    "course", clinic.course["external_id"]
                )
            assert stored is not None
            assert orjson.loads(stored.body)["status"] == "on_hold"
            drain(worker, clinic_services, target)
            assert ehr.updates.get("CarePlan", 0) == updates_before
            assert status_of(clinic_services, target)["echoes_suppressed"] >= 1
            # Both sides change the notes: a recorded conflict, the clinic's notes stay.
            put(
                clinic_services,
                clinic.course | {"status": "on_hold", "notes": ["clinic: BP watch"]},
            )
            ehr.change("CarePlan", plan["id"], note=[{"text": "ehr: reduce dose"}])
            sync.poll(target, client)
            with clinic_services.database.unit_of_work(write=False) as uow:
                conflicts = ledger.conflicts(uow.connection)
                stored = RecordRepository(uow.connection).get(
                    "course", clinic.course["external_id"]
                )
            mine = [
                c for c in conflicts if c["record"]["external_id"] == clinic.course["external_id"]
            ]
            assert [(c["field"], c["clinic_value"], c["ehr_value"]) for c in mine] == [
                ("notes", ["clinic: BP watch"], ["ehr: reduce dose"])
            ]
            assert stored is not None
            assert orjson.loads(stored.body)["notes"] == ["clinic: BP watch"]
            # Resolving it is audited with the change; a second try finds nothing open.
            with TestClient(create_app(clinic_services)) as http:
                resolved = http.post(f"/api/v1/sync/conflicts/{mine[0]['id']}/resolve")
                assert resolved.json() == {"id": mine[0]["id"], "status": "resolved"}
                again = http.post(f"/api/v1/sync/conflicts/{mine[0]['id']}/resolve")
                assert again.status_code == 404
            (event,) = audit_events_saying(clinic_services, f'"resolve conflict {mine[0]["id"]}"')
            assert {"reference": mine[0]["resource"]} in [e.get("what") for e in event["entity"]]
            assert {"reference": f"Patient/{patient_resource_id(clinic)}"} in [
                e.get("what") for e in event["entity"]
            ]
        finally:
            worker.close()


def test_subscription_notifications_apply_plans_and_a_gap_asks_for_a_catch_up(
    clinic_services: Services, tmp_path: Path
) -> None:
    ehr = RestrictedEhr(writable=frozenset({"CarePlan"}), updatable=frozenset({"CarePlan"}))
    with serve_in_thread(ehr.app) as base:
        ehr.base = base
        target = destination(
            base,
            send="[CarePlan]",
            extra="    care_plan_sync: {poll_interval_seconds: 3600, notification_token: s3cret}",
        )
        worker = worker_for(clinic_services, target)
        try:
            clinic = _restricted_setup(clinic_services, ehr, with_encounter=False)
            drain(worker, clinic_services, target)
            (plan,) = ehr.of("CarePlan")
        finally:
            worker.close()
        services = clinic_services
        services.__dict__["destinations"] = (target,)
        app = create_app(services)
        changed = ehr.change(
            "CarePlan",
            plan["id"],
            status="completed",
            period={"start": "2026-10-05", "end": "2026-11-30"},
        )

        def note(kind: str, number: int | None, *resources: dict[str, Any]) -> dict[str, Any]:
            parameters: list[dict[str, Any]] = [{"name": "type", "valueCode": kind}]
            if number is not None:
                parameters.append(
                    {"name": "events-since-subscription-start", "valueString": str(number)}
                )
                if kind == "event-notification":
                    parameters.append(
                        {
                            "name": "notification-event",
                            "part": [{"name": "event-number", "valueString": str(number)}],
                        }
                    )
            return {
                "resourceType": "Bundle",
                "type": "history",
                "entry": [
                    {"resource": {"resourceType": "Parameters", "parameter": parameters}},
                    *({"resource": r} for r in resources),
                ],
            }

        url = f"/api/v1/sync/notifications/{target.name}"
        auth = {"Authorization": "Bearer s3cret"}
        with TestClient(app) as http:
            assert http.post(url, json=note("handshake", 0)).status_code == 401
            assert http.post(url, json=note("handshake", 0), headers=auth).json()["gap"] is False
            answer = http.post(
                url, json=note("event-notification", 1, changed), headers=auth
            ).json()
            assert answer == {
                "type": "event-notification",
                "gap": False,
                "catch_up": False,
                "applied": 1,
            }
            assert http.post(url, json=note("heartbeat", 1), headers=auth).json()["gap"] is False
            assert (
                http.post(url, json=note("event-notification", 4), headers=auth).json()["gap"]
                is True
            )
            assert (
                http.post(
                    url, json={"resourceType": "Bundle", "type": "batch"}, headers=auth
                ).status_code
                == 400
            )
            status = http.get("/api/v1/sync/status").json()["destinations"][0]
            assert status["subscription_events"] == 4
            metrics = http.get("/metrics").text
            assert "infusion_bridge_delivery_latency_seconds_bucket" in metrics
            assert f'infusion_bridge_delivery_queue_depth{{destination="{target.name}"}}' in metrics
        with clinic_services.database.unit_of_work(write=False) as uow:
            state = ledger.destination_state(uow.connection, target.name)
            from service.records.repository import RecordRepository

            stored = RecordRepository(uow.connection).get("course", clinic.course["external_id"])
        assert state.pull_requested is True
        assert stored is not None
        assert orjson.loads(stored.body)["status"] == "completed"


# --- care plans polled per patient (care_plan_sync.by_patient) ------------------------------------

CARE_PLAN_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/careplan-category|assess-plan"


class PatientScopedEhr(RestrictedEhr):
    """A `RestrictedEhr` that searches CarePlans only within a patient, as Epic and Oracle Health
    do: 400 for a search that names no patient. A lookup by identifier (as delivery makes before
    a create) is let through without one unless `lookups_need_patient` names its type, and is
    kept in `lookups`. Keeps the parameters of each other CarePlan search; a search of a patient
    in `failing` answers `failing_status`. Its CapabilityStatement lists `patient` among the
    search parameters of CarePlan and DocumentReference."""

    def __init__(self, *, lookups_need_patient: frozenset[str] = frozenset(), **options: Any):
        super().__init__(**options)
        self.lookups_need_patient = lookups_need_patient
        self.lookups: list[tuple[str, dict[str, str]]] = []
        self.care_plan_searches: list[dict[str, str]] = []
        self.failing: set[str] = set()
        self.failing_status = 503

    async def metadata(self, request: Request) -> JSONResponse:
        statement = orjson.loads((await super().metadata(request)).body)
        for resource in statement["rest"][0]["resource"]:
            if resource["type"] in ("CarePlan", "DocumentReference"):
                resource["searchParam"].append({"name": "patient", "type": "reference"})
        return JSONResponse(statement, media_type="application/fhir+json")

    async def search_or_create(self, request: Request) -> Response:
        query = dict(request.query_params)
        resource_type = request.path_params["type"]
        if request.method == "GET" and "identifier" in query:
            self.lookups.append((resource_type, query))
            if resource_type in self.lookups_need_patient and "patient" not in query:
                return _operation_outcome(
                    400, f"{resource_type} searches need a patient", "required"
                )
        elif request.method == "GET" and resource_type == "CarePlan":
            self.care_plan_searches.append(query)
            if "patient" not in query:
                return _operation_outcome(400, "CarePlan searches need a patient", "required")
            if query["patient"] in self.failing:
                return _operation_outcome(self.failing_status, "not now", "transient")
        return await super().search_or_create(request)


def _operation_outcome(status: int, text: str, code: str) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    return Response(orjson.dumps(body), status_code=status, media_type="application/fhir+json")


def by_patient_setup(
    clinic_services: Services, ehr: PatientScopedEhr, base: str
) -> tuple[Destination, DeliveryWorker, list[tuple[factory.Clinic, str]]]:
    """A destination polled per patient, a worker delivering to it, and two patients whose plans
    it pushed to the EHR: each clinic with its EHR Patient id."""
    ehr.base = base
    target = destination(
        base,
        send="[CarePlan]",
        extra="    care_plan_sync: {poll_interval_seconds: 3600, by_patient: true,\n"
        f'                     category: "{CARE_PLAN_CATEGORY}"}}',
    )
    # The worker only delivers: the tests poll when they mean to.
    worker = worker_for(clinic_services, target.model_copy(update={"care_plan_sync": None}))
    clinics = [_restricted_setup(clinic_services, ehr, with_encounter=False) for _ in range(2)]
    drain(worker, clinic_services, target)
    pairs = []
    for clinic in clinics:
        (value,) = [i["value"] for i in clinic.patient["ehr_identifiers"]]
        (patient,) = [p for p in ehr.of("Patient") if p["identifier"][0]["value"] == value]
        pairs.append((clinic, patient["id"]))
    return target, worker, pairs


def plan_of(ehr: RestrictedEhr, patient_id: str) -> dict[str, Any]:
    (plan,) = [
        p for p in ehr.of("CarePlan") if p["subject"]["reference"] == f"Patient/{patient_id}"
    ]
    return plan


def patient_cursors(services: Services, target: Destination) -> dict[str, str | None]:
    with services.database.unit_of_work(write=False) as uow:
        return dict(ledger.patient_cursors(uow.connection, target.name))


def course_of(services: Services, clinic: factory.Clinic) -> tuple[int, dict[str, Any]]:
    """The course's record version and body."""
    from service.records.repository import RecordRepository

    with services.database.unit_of_work(write=False) as uow:
        stored = RecordRepository(uow.connection).get("course", clinic.course["external_id"])
    assert stored is not None
    return stored.version, orjson.loads(stored.body)


def test_care_plans_are_polled_per_patient_where_the_ehr_searches_them_only_within_one(
    clinic_services: Services,
) -> None:
    ehr = PatientScopedEhr(writable=frozenset({"CarePlan"}), updatable=frozenset({"CarePlan"}))
    with serve_in_thread(ehr.app) as base:
        target, worker, pairs = by_patient_setup(clinic_services, ehr, base)
        (first, first_id), (second, second_id) = pairs
        sync, client = worker.care_plans, worker.clients[target.name]
        try:
            # One search of every CarePlan is what this EHR refuses.
            assert target.care_plan_sync is not None
            everything = target.model_copy(
                update={
                    "care_plan_sync": target.care_plan_sync.model_copy(update={"by_patient": False})
                }
            )
            with pytest.raises(PermanentFailure) as refusal:
                sync.poll(everything, client)
            assert refusal.value.status == 400
            ehr.care_plan_searches.clear()
            # What the worker pushed is not pulled back as new; each patient gets a cursor.
            assert sync.poll(target, client) == 0
            assert ehr.care_plan_searches == [
                {
                    "patient": patient_id,
                    "_sort": "_lastUpdated",
                    "_count": "100",
                    "category": CARE_PLAN_CATEGORY,
                }
                for patient_id in sorted([first_id, second_id])
            ]
            pushed = {p: plan_of(ehr, p)["meta"]["lastUpdated"] for p in (first_id, second_id)}
            assert patient_cursors(clinic_services, target) == pushed
            # The EHR puts both plans on hold: each patient's search brings its plan.
            for patient_id in (first_id, second_id):
                ehr.change("CarePlan", plan_of(ehr, patient_id)["id"], status="on-hold")
            assert sync.poll(target, client) == 2
            for clinic in (first, second):
                assert course_of(clinic_services, clinic)[1]["status"] == "on_hold"
            held = {p: plan_of(ehr, p)["meta"]["lastUpdated"] for p in (first_id, second_id)}
            assert patient_cursors(clinic_services, target) == held
            # Nothing new: nothing changes, each search starts at its patient's cursor.
            versions = [course_of(clinic_services, c)[0] for c in (first, second)]
            ehr.care_plan_searches.clear()
            assert sync.poll(target, client) == 0
            assert [course_of(clinic_services, c)[0] for c in (first, second)] == versions
            assert patient_cursors(clinic_services, target) == held
            assert sorted(
                (s["patient"], s["_lastUpdated"]) for s in ehr.care_plan_searches
            ) == sorted((p, f"ge{cursor}") for p, cursor in held.items())
            # One patient's plan changes: only that patient's cursor moves.
            ehr.change("CarePlan", plan_of(ehr, first_id)["id"], status="active")
            assert sync.poll(target, client) == 1
            assert course_of(clinic_services, first)[1]["status"] == "active"
            assert course_of(clinic_services, second)[1]["status"] == "on_hold"
            assert patient_cursors(clinic_services, target) == {
                first_id: plan_of(ehr, first_id)["meta"]["lastUpdated"],
                second_id: held[second_id],
            }
            assert held[first_id] < plan_of(ehr, first_id)["meta"]["lastUpdated"]
            assert status_of(clinic_services, target)["care_plan_patient_cursors"] == 2
        finally:
            worker.close()


@pytest.mark.parametrize("failing_status", [403, 503])
def test_a_patients_failed_care_plan_search_keeps_its_cursor_and_not_the_others_progress(
    clinic_services: Services, failing_status: int, caplog: pytest.LogCaptureFixture
) -> None:
    ehr = PatientScopedEhr(writable=frozenset({"CarePlan"}), updatable=frozenset({"CarePlan"}))
    ehr.failing_status = failing_status
    with serve_in_thread(ehr.app) as base:
        target, worker, pairs = by_patient_setup(clinic_services, ehr, base)
        (first, first_id), (second, second_id) = pairs
        sync, client = worker.care_plans, worker.clients[target.name]
        try:
            assert sync.poll(target, client) == 0
            before = patient_cursors(clinic_services, target)
            for patient_id in (first_id, second_id):
                ehr.change("CarePlan", plan_of(ehr, patient_id)["id"], status="on-hold")
            ehr.failing = {first_id}
            with caplog.at_level("WARNING", logger="service.sync.care_plans"):
                assert sync.poll(target, client) == 1
            assert course_of(clinic_services, first)[1]["status"] == "active"
            assert course_of(clinic_services, second)[1]["status"] == "on_hold"
            assert patient_cursors(clinic_services, target) == {
                first_id: before[first_id],
                second_id: plan_of(ehr, second_id)["meta"]["lastUpdated"],
            }
            assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
                f"care plans of Patient/{first_id} from {target.name} not polled: "
                f"GET /CarePlan answered {failing_status}"
            ]
            # The next poll searches it again from its cursor.
            ehr.failing = set()
            ehr.care_plan_searches.clear()
            assert sync.poll(target, client) == 1
            assert course_of(clinic_services, first)[1]["status"] == "on_hold"
            assert {s["patient"]: s["_lastUpdated"] for s in ehr.care_plan_searches} == {
                first_id: f"ge{before[first_id]}",
                second_id: f"ge{plan_of(ehr, second_id)['meta']['lastUpdated']}",
            }
            assert patient_cursors(clinic_services, target) == {
                p: plan_of(ehr, p)["meta"]["lastUpdated"] for p in (first_id, second_id)
            }
        finally:
            worker.close()


def test_a_notification_gap_makes_a_catch_up_poll_of_every_patient(
    clinic_services: Services,
) -> None:
    ehr = PatientScopedEhr(writable=frozenset({"CarePlan"}), updatable=frozenset({"CarePlan"}))
    with serve_in_thread(ehr.app) as base:
        target, worker, pairs = by_patient_setup(clinic_services, ehr, base)
        sync, client = worker.care_plans, worker.clients[target.name]
        try:
            assert sync.poll(target, client) == 0
            for _, patient_id in pairs:
                ehr.change("CarePlan", plan_of(ehr, patient_id)["id"], status="on-hold")
            ehr.care_plan_searches.clear()
            assert sync.poll_if_due(target, client) == 0  # the next poll is an hour away
            assert ehr.care_plan_searches == []

            def status(kind: str, events: int) -> dict[str, Any]:
                parameters = [
                    {"name": "type", "valueCode": kind},
                    {"name": "events-since-subscription-start", "valueString": str(events)},
                ]
                return {
                    "resourceType": "Bundle",
                    "type": "history",
                    "entry": [
                        {"resource": {"resourceType": "Parameters", "parameter": parameters}}
                    ],
                }

            sync.notify(target, status("handshake", 0))
            assert sync.notify(target, status("heartbeat", 2))["catch_up"] is True
            assert sync.poll_if_due(target, client) == 2
            assert sorted(s["patient"] for s in ehr.care_plan_searches) == sorted(
                p for _, p in pairs
            )
            for clinic, _ in pairs:
                assert course_of(clinic_services, clinic)[1]["status"] == "on_hold"
            ehr.care_plan_searches.clear()
            assert sync.poll_if_due(target, client) == 0
            assert ehr.care_plan_searches == []
        finally:
            worker.close()


def test_lookups_before_a_create_name_the_patient_where_the_ehr_searches_only_within_one(
    clinic_services: Services,
) -> None:
    """Delivery's identifier lookups of a CarePlan, and of the summary standing in for an
    infusion, search within the patient it matched: an EHR that refuses a patient-less search
    takes both, and a copy whose ledger entry was lost is found again, not created twice."""
    scoped = frozenset({"CarePlan", "DocumentReference"})
    ehr = PatientScopedEhr(
        writable=frozenset({"CarePlan", "DocumentReference"}),
        updatable=frozenset({"CarePlan"}),
        lookups_need_patient=scoped,
    )
    with serve_in_thread(ehr.app) as base:
        ehr.base = base
        target = destination(base, send="[CarePlan, MedicationAdministration]")
        worker = worker_for(clinic_services, target)
        try:
            clinic = _restricted_setup(clinic_services, ehr, with_encounter=False)
            drain(worker, clinic_services, target)
            assert worker.plans[target.name].as_json() == {
                "CarePlan": "ledger",
                "MedicationAdministration": "document-reference",
            }
            assert refused(clinic_services, target) == [], [
                (d["error"], d["outcome"]) for d in refused(clinic_services, target)
            ]
            (value,) = [i["value"] for i in clinic.patient["ehr_identifiers"]]
            (patient,) = [p for p in ehr.of("Patient") if p["identifier"][0]["value"] == value]
            (plan,) = ehr.of("CarePlan")
            (document,) = ehr.of("DocumentReference")
            for resource in (plan, document):
                assert resource["subject"]["reference"] == f"Patient/{patient['id']}"
            assert sorted(
                (kind, query.get("patient")) for kind, query in ehr.lookups if kind in scoped
            ) == [("CarePlan", patient["id"]), ("DocumentReference", patient["id"])]
            # The ledger loses the plan (a crash between the EHR's answer and the commit): the
            # next change is looked up within the patient again and lands on the same copy.
            with clinic_services.database.unit_of_work(write=True) as uow:
                uow.connection.execute(
                    sync_ledger.delete().where(
                        sync_ledger.c.destination == target.name,
                        sync_ledger.c.resource_type == "CarePlan",
                    )
                )
                uow.commit()
            ehr.lookups.clear()
            put(clinic_services, clinic.course | {"notes": ["clinic: BP watch"]})
            drain(worker, clinic_services, target)
            assert refused(clinic_services, target) == []
            assert [q.get("patient") for kind, q in ehr.lookups if kind == "CarePlan"] == [
                patient["id"]
            ]
            (plan,) = ehr.of("CarePlan")
            assert [n["text"] for n in plan.get("note", [])] == ["clinic: BP watch"]
            assert ehr.creates["CarePlan"] == 1
            assert ehr.updates["CarePlan"] == 1
        finally:
            worker.close()


def test_dead_letters_through_the_api_and_the_cli(
    clinic_services: Services, ehr_server: Server, database_url: str, tmp_path: Path
) -> None:
    value = f"E-{os.urandom(4).hex()}"
    target = destination(f"{ehr_server.base_url}/fhir", send="[Encounter]")
    worker = worker_for(clinic_services, target)
    clinic = write_clinic(clinic_services, value)
    try:
        drain(worker, clinic_services, target)
    finally:
        worker.close()
    clinic_services.__dict__["destinations"] = (target,)
    with TestClient(create_app(clinic_services)) as http:
        params = {"destination": target.name, "limit": "1000"}
        items = http.get("/api/v1/sync/dead-letters", params=params).json()
        (letter,) = [
            d for d in items["items"] if d["resource"] == f"Encounter/{encounter_id(clinic)}"
        ]
        assert (
            http.post(f"/api/v1/sync/dead-letters/{letter['id']}/retry").json()["status"]
            == "pending"
        )
        assert http.post(f"/api/v1/sync/dead-letters/{letter['id']}/skip").status_code == 404
    drain(worker_for(clinic_services, target), clinic_services, target)
    destinations_file = tmp_path / "destinations.yaml"
    destinations_file.write_text(
        f"destinations:\n  - name: {target.name}\n    base_url: {target.base}\n"
        f"    patients: {{match_identifier_system: '{MATCH}'}}\n"
    )
    env = server_env(database_url, DESTINATIONS_FILE=str(destinations_file))
    shown = orjson.loads(cli("sync", "status", "--dead-letters", env=env).stdout)
    (mine,) = [d for d in shown["dead_letters"] if d["id"] == letter["id"]]
    assert cli("sync", "skip", str(letter["id"]), env=env).returncode == 0
    assert cli("sync", "skip", str(letter["id"]), env=env, check=False).returncode == 1
    listed = orjson.loads(cli("destinations", env=env).stdout)
    assert listed[0]["name"] == target.name
    assert mine["status"] == "dead"
    # Each action is audited with its change: what, to which destination, by whom.
    events = audit_events_saying(clinic_services, f"dead letter {letter['id']} to")
    assert sorted(
        (e["outcomeDesc"], e["agent"][0]["who"]["identifier"]["value"]) for e in events
    ) == [
        (f"retry dead letter {letter['id']} to {target.name}", "local"),
        (f"skip dead letter {letter['id']} to {target.name}", "cli"),
    ]
    assert all(
        {"reference": f"Encounter/{encounter_id(clinic)}/_history/{letter['version']}"}
        in [entity.get("what") for entity in e["entity"]]
        for e in events
    )


def test_kill_minus_nine_mid_delivery_loses_and_duplicates_nothing(
    database_url: str, ehr_server: Server, tmp_path: Path
) -> None:
    services = bootstrap(Settings(database_url=database_url, auth_disabled=True))
    values = [f"E-{os.urandom(4).hex()}" for _ in range(6)]
    for value in values:
        register_patient(ehr_server, value)
    proxy = FaultProxy(f"{ehr_server.base_url}/fhir")
    with serve_in_thread(proxy.app) as proxy_base:
        target = destination(proxy_base)
        destinations_file = tmp_path / "destinations.yaml"
        destinations_file.write_text(
            f"destinations:\n  - name: {target.name}\n    base_url: {proxy_base}\n"
            f"    send: {FULL_SEND}\n    patients: {{match_identifier_system: '{MATCH}'}}\n"
            "    backfill: false\n"
        )
        with services.database.unit_of_work() as uow:
            ledger.ensure_destinations(uow.connection, [target])  # before the records
            uow.commit()
        env = server_env(
            database_url,
            DESTINATIONS_FILE=str(destinations_file),
            WORKER_LEASE_SECONDS="1",
            WORKER_BATCH_SIZE="5",
            WORKER_CONCURRENCY="2",
            WORKER_IDLE_SECONDS="0.05",
            WORKER_RETRY_BASE_SECONDS="0.05",
        )
        clinics = [write_clinic(services, value) for value in values]
        proxy.faults.extend(["slow:0.15"] * 10_000)  # every request slow: the kill lands mid-batch
        first = subprocess.Popen(
            [CLI, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while status_of(services, target)["delivered"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        halfway = status_of(services, target)
        assert halfway["queue_depth"] > 0, "the kill came after the work was done"
        proxy.faults.clear()
        workers = [
            subprocess.Popen(
                [CLI, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for _ in range(2 if services.database.backend == "postgresql" else 1)
        ]
        try:
            deadline = time.monotonic() + 60
            while status_of(services, target)["queue_depth"] and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            for process in workers:
                process.terminate()
                process.wait(30)
    assert status_of(services, target)["queue_depth"] == 0
    assert refused(services, target) == []
    for clinic in clinics:
        for resource in sent_resources(services, patient_resource_id(clinic), TYPES):
            assert len(copies_in(f"{ehr_server.base_url}/fhir", resource)) == 1
    services.close()
