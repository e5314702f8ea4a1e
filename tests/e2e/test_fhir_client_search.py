"""Search driven by real FHIR clients over a real socket: fhirclient's FHIRSearch and fhirpy.

The clients build their own query strings, parse the searchset Bundles with their own models and
follow the server's `next` links, as an EHR integration would.
"""

from __future__ import annotations

import pytest
from fhirclient.models import bundle, encounter, observation, patient
from fhirpy.base.searchset import Raw

from mappings.context import resource_id
from tests.e2e.conftest import Server
from tests.e2e.test_fhir_clients import fhirpy, load, smart

pytestmark = pytest.mark.e2e


def test_fhirclient_searches_with_its_own_query_builder(server: Server) -> None:
    records = load(server)
    patient_id = resource_id("patient", records.patient["external_id"])
    client = smart(server)

    found = list(
        patient.Patient.where(
            struct={
                "identifier": f"http://infusion-bridge.org/fhir/sid/mrn|{records.patient['mrn']}"
            }
        ).perform_resources_iter(client.server)
    )
    assert [p.id for p in found] == [patient_id]

    heart_rates = list(
        observation.Observation.where(
            struct={"subject": f"Patient/{patient_id}", "code": "http://loinc.org|8867-4"}
        ).perform_resources_iter(client.server)
    )
    assert heart_rates
    assert {o.code.coding[0].code for o in heart_rates} == {"8867-4"}
    assert all(o.subject.reference == f"Patient/{patient_id}" for o in heart_rates)

    (visits,) = encounter.Encounter.where(struct={"patient": patient_id}).perform_iter(
        client.server
    )
    assert isinstance(visits, bundle.Bundle)
    assert visits.type == "searchset"
    assert visits.total == len(visits.entry) >= 1


def test_fhirpy_pages_sorts_and_includes(server: Server) -> None:
    records = load(server)
    patient_id = resource_id("patient", records.patient["external_id"])
    client = fhirpy(server)

    searched = client.resources("Observation").search(patient=patient_id)
    everything = searched.limit(1000).fetch()
    # fetch_all follows the server's `next` links page by page.
    paged = searched.limit(3).fetch_all()
    assert sorted(o.id for o in paged) == sorted(o.id for o in everything)
    assert len({o.id for o in paged}) == len(paged)
    assert searched.count() == len(everything)

    newest_first = (
        client.resources("Observation")
        .search(patient=patient_id, code="8867-4")
        .sort("-date")
        .fetch()
    )
    moments = [o["effectiveDateTime"] for o in newest_first]
    assert moments == sorted(moments, reverse=True)

    with_patient = (
        client.resources("Observation")
        .search(Raw(**{"_id": everything[0].id}))
        .include("Observation", "subject")
        .fetch_raw()
    )
    kinds = sorted(e["resource"]["resourceType"] for e in with_patient["entry"])
    assert kinds == ["Observation", "Patient"]

    dated = client.resources("Observation").search(date__ge="2026-10-05", patient=patient_id)
    assert dated.count() >= 1
    assert client.resources("Observation").search(date__lt="1990-01-01").count() == 0
