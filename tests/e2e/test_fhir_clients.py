"""The FHIR facade driven by real FHIR clients over a real socket: fhirclient and fhirpy.

Records go in through the intake API over HTTP; the facade is then read the way an EHR
integration would read it: the SMART on FHIR python client (`fhirclient`, strict R4 models) and
`fhirpy`. What is checked is what those clients see: the CapabilityStatement, every resource of a
clinic parsed by the strict R4 models without loss, versions after an update, vread, history
Bundles and their paging links, a deleted vitals Observation (410), and errors as
OperationOutcomes the clients can read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import requests
from fhirclient import client as smart_client
from fhirclient.models import (
    bundle,
    capabilitystatement,
    encounter,
    observation,
    operationoutcome,
    organization,
    patient,
)
from fhirclient.models.fhirelementfactory import FHIRElementFactory
from fhirclient.server import FHIRNotFoundException
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome, ResourceNotFound
from sqlalchemy import select

from mappings.context import resource_id
from service.fhir.api import STORED_TYPES
from service.store.db import Database
from service.store.tables import record_resources
from tests.e2e.conftest import Server
from tests.factory import Clinic, Record, clinic, path_of

pytestmark = pytest.mark.e2e

SECOND_VITALS_AT = "2026-10-05T09:44:00-04:00"
"""The session factory's second vitals set: removing it deletes its Observations."""


def load(server: Server) -> Clinic:
    """One clinic's records, written through the intake API."""
    records = clinic()
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for record in records.records():
            response = http.put(path_of(record), json=record)
            assert response.status_code == 201, response.text
    return records


def update(server: Server, record: Record) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        response = http.put(path_of(record), json=record)
        assert response.status_code == 200, response.text
        assert response.headers["x-record-outcome"] == "updated"


def smart(server: Server) -> smart_client.FHIRClient:
    return smart_client.FHIRClient(settings={"app_id": "x", "api_base": server.base_url + "/fhir"})


def fhirpy(server: Server) -> SyncFHIRClient:
    return SyncFHIRClient(server.base_url + "/fhir", requests_config={"timeout": 30})


def outcome_of(error: requests.HTTPError | FHIRNotFoundException) -> Any:
    """The error's body as fhirclient's strict R4 OperationOutcome."""
    response = error.response
    assert response is not None
    assert response.headers["content-type"].startswith("application/fhir+json")
    return operationoutcome.OperationOutcome(response.json())


def issue_of(error: ResourceNotFound) -> Any:
    """fhirpy raises 404 and 410 as ResourceNotFound carrying the response body as its text."""
    outcome = json.loads(str(error))
    assert outcome["resourceType"] == "OperationOutcome"
    return outcome["issue"][0]


def resources_of(database_url: str, records: Clinic) -> Iterator[tuple[str, str]]:
    """(type, id) of every resource the clinic's records map to, as the store links them."""
    keys = [(r["kind"], r["external_id"]) for r in records.records()]
    database = Database(database_url)
    try:
        with database.engine.connect() as connection:
            rows = connection.execute(
                select(record_resources.c.resource_type, record_resources.c.resource_id).where(
                    record_resources.c.record_kind.in_({kind for kind, _ in keys}),
                    record_resources.c.record_id.in_({id_ for _, id_ in keys}),
                )
            ).all()
    finally:
        database.dispose()
    yield from sorted((row.resource_type, row.resource_id) for row in rows)


def test_fhirclient_reads_the_capability_statement_and_every_resource_strictly(
    server: Server, e2e_database_url: str
) -> None:
    since = datetime.now(UTC).isoformat()
    records = load(server)
    client = smart(server)

    # No security in the CapabilityStatement: the SMART client finds an open server.
    assert client.prepare() is True
    statement = client.server.capabilityStatement
    assert isinstance(statement, capabilitystatement.CapabilityStatement)
    assert statement.fhirVersion == "4.0.1"
    assert statement.kind == "instance"
    rest = statement.rest[0]
    assert rest.mode == "server"
    by_type = {entry.type: entry for entry in rest.resource}
    assert [i.code for i in by_type["Patient"].interaction] == [
        "read",
        "vread",
        "history-instance",
        "history-type",
        "search-type",
        "create",
        "update",
        "patch",
    ]
    assert by_type["Observation"].versioning == "versioned-update"
    assert by_type["Observation"].conditionalCreate is True
    assert "patient" in [p.name for p in by_type["Observation"].searchParam]
    assert [i.code for i in by_type["StructureDefinition"].interaction] == ["read"]

    patient_id = resource_id("patient", records.patient["external_id"])
    read = patient.Patient.read(patient_id, client.server)
    assert read.id == patient_id
    assert read.meta.versionId == "1"
    assert read.gender == "female"
    assert read.birthDate.isostring == "1984-03-02"
    assert read.name[0].family == "Silva"
    assert read.name[0].given == ["Ana"]
    by_value = {identifier.value: identifier for identifier in read.identifier}
    assert records.patient["external_id"] in by_value
    mrn = by_value[records.patient["mrn"]]
    assert mrn.type.coding[0].code == "MR"

    # Relative references resolve on the same server, as fhirclient follows them.
    managing = read.managingOrganization.resolved(organization.Organization)
    assert isinstance(managing, organization.Organization)
    assert managing.name

    encounter_id = resource_id("session", records.session["external_id"], "Encounter")
    visit = encounter.Encounter.read(encounter_id, client.server)
    subject = visit.subject.resolved(patient.Patient)
    assert subject.id == patient_id

    # Every resource of the clinic (and the Provenance of its writes) parses with the strict R4
    # models and comes back out unchanged: nothing the clients do not know, nothing dropped.
    targets = list(resources_of(e2e_database_url, records))
    provenance = bundle.Bundle.read_from(
        f"Provenance/_history?_count=100&_since={quote(since)}", client.server
    )
    assert provenance.type == "history"
    targets += [("Provenance", entry.resource.id) for entry in provenance.entry]
    targets.append(("Organization", managing.id))
    types = {resource_type for resource_type, _ in targets}
    assert types >= set(STORED_TYPES) - {"AuditEvent"}  # the audit trail is no clinic data
    for resource_type, id_ in targets:
        served = client.server.request_json(f"{resource_type}/{id_}")
        parsed = FHIRElementFactory.instantiate(resource_type, served)
        assert parsed.id == id_
        assert parsed.meta.versionId.isdigit()
        assert parsed.as_json() == served, f"{resource_type}/{id_} does not round-trip"


def test_versions_vread_and_history_after_an_update_through_intake(server: Server) -> None:
    records = load(server)
    patient_id = resource_id("patient", records.patient["external_id"])
    update(server, records.patient | {"sex": "other"})

    # fhirclient: read, vread, history.
    client = smart(server)
    current = patient.Patient.read(patient_id, client.server)
    assert current.meta.versionId == "2"
    assert current.gender == "other"
    first = patient.Patient.read_from(f"Patient/{patient_id}/_history/1", client.server)
    assert first.meta.versionId == "1"
    assert first.gender == "female"
    assert first.meta.lastUpdated.date <= current.meta.lastUpdated.date
    with pytest.raises(FHIRNotFoundException) as missing:
        patient.Patient.read_from(f"Patient/{patient_id}/_history/3", client.server)
    assert outcome_of(missing.value).issue[0].code == "not-found"
    history = bundle.Bundle.read_from(f"Patient/{patient_id}/_history", client.server)
    assert history.type == "history"
    assert [e.response.etag for e in history.entry] == ['W/"2"', 'W/"1"']
    assert [e.request.method for e in history.entry] == ["PUT", "POST"]
    assert [e.resource.gender for e in history.entry] == ["other", "female"]

    # fhirpy: read, vread, and the same history a page at a time through its `next` links.
    fhir = fhirpy(server)
    resource = fhir.reference("Patient", patient_id).to_resource()
    assert resource["meta"]["versionId"] == "2"
    assert resource["gender"] == "other"
    assert fhir.get("Patient", patient_id)["meta"]["versionId"] == "2"
    old = fhir.execute(f"Patient/{patient_id}/_history/1", method="get")
    assert (old["meta"]["versionId"], old["gender"]) == ("1", "female")
    pages: list[list[str]] = []
    page = fhir.execute(f"Patient/{patient_id}/_history", method="get", params={"_count": 1})
    while True:
        assert page["resourceType"] == "Bundle"
        pages.append([entry["resource"]["meta"]["versionId"] for entry in page["entry"]])
        following = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not following:
            break
        page = fhir.execute(following[0], method="get")
    assert pages == [["2"], ["1"]]


def test_gone_and_other_errors_are_operation_outcomes_the_clients_read(server: Server) -> None:
    records = load(server)
    patient_id = resource_id("patient", records.patient["external_id"])
    session = records.session
    bp_id = resource_id("session", session["external_id"], "vitals", SECOND_VITALS_AT, "bp")
    client = smart(server)
    fhir = fhirpy(server)
    before = observation.Observation.read(bp_id, client.server)
    assert before.status == "final"
    assert "85354-9" in [coding.code for coding in before.code.coding]

    update(server, session | {"vitals": session["vitals"][:1]})

    with pytest.raises(requests.HTTPError) as gone:
        observation.Observation.read(bp_id, client.server)
    assert gone.value.response is not None
    assert gone.value.response.status_code == 410
    issue = outcome_of(gone.value).issue[0]
    assert (issue.severity, issue.code) == ("error", "deleted")
    with pytest.raises(ResourceNotFound) as fhirpy_gone:
        fhir.reference("Observation", bp_id).to_resource()
    assert issue_of(fhirpy_gone.value)["code"] == "deleted"

    # The versions before the deletion stay readable; the deletion itself is a version.
    kept = observation.Observation.read_from(f"Observation/{bp_id}/_history/1", client.server)
    assert kept.meta.versionId == "1"
    assert [c.code.coding[0].code for c in kept.component] == ["8480-6", "8462-4"]
    with pytest.raises(requests.HTTPError) as deleted_version:
        observation.Observation.read_from(f"Observation/{bp_id}/_history/2", client.server)
    assert outcome_of(deleted_version.value).issue[0].code == "deleted"
    history = fhir.execute(f"Observation/{bp_id}/_history", method="get")
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert "resource" not in history["entry"][0]
    parsed = bundle.Bundle(history)
    assert parsed.entry[0].resource is None
    assert parsed.entry[1].resource.id == bp_id

    # The first vitals set is untouched.
    pre_bp = resource_id(
        "session", session["external_id"], "vitals", session["vitals"][0]["taken_at"], "bp"
    )
    assert fhir.get("Observation", pre_bp)["meta"]["versionId"] == "1"

    # Other errors: unknown ids and types, XML, bad parameters, writes.
    with pytest.raises(FHIRNotFoundException) as unknown:
        patient.Patient.read("does-not-exist", client.server)
    issue = outcome_of(unknown.value).issue[0]
    assert (issue.severity, issue.code) == ("error", "not-found")
    assert "does-not-exist" in issue.diagnostics

    with pytest.raises(requests.HTTPError) as xml:
        client.server.request_data("metadata", headers={"Accept": "application/fhir+xml"})
    assert xml.value.response is not None
    assert xml.value.response.status_code == 406
    assert outcome_of(xml.value).issue[0].code == "not-supported"

    with pytest.raises(ResourceNotFound) as unknown_type:
        fhir.reference("Invoice", "1").to_resource()
    assert issue_of(unknown_type.value)["code"] == "not-found"

    with pytest.raises(OperationOutcome) as bad_count:
        fhir.execute("Patient/_history", method="get", params={"_count": 0})
    assert bad_count.value.resource["issue"][0]["code"] == "invalid"
    assert "_count" in bad_count.value.resource["issue"][0]["diagnostics"]

    with pytest.raises(OperationOutcome) as bad_page:
        fhir.execute("Patient/_history", method="get", params={"_page": "garbage"})
    assert bad_page.value.resource["issue"][0]["code"] == "invalid"

    # Writes are not part of the facade yet: a DELETE is refused and changes nothing.
    with pytest.raises(OperationOutcome) as refused:
        fhir.delete("Patient", patient_id)
    assert refused.value.resource["resourceType"] == "OperationOutcome"
    assert refused.value.resource["issue"][0]["code"] == "not-supported"
    assert fhir.get("Patient", patient_id)["meta"]["versionId"] == "1"
