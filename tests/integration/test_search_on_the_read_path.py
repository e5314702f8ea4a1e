"""Searches run on the read path's connections (`ResourceReader.select`, as the facade runs a
search that is one statement) answer row for row what the unit of work's connection answers: the
same values bound (dates at the edges of their ranges, `IN` lists, quantities), the same rows,
the same sort values and so the same next pages. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from service.fhir.search import (
    SearchQuery,
    one_statement,
    page_of,
    page_statement,
    parse_search,
    query_string,
    run_search,
)
from service.store.db import Database
from service.store.reads import ResourceReader, resource_reader
from service.store.resources import ResourceRepository

BASE = "http://testserver/fhir"
TAG_SYSTEM = "urn:test:tag"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
LOINC = "http://loinc.org"

# Instants on and around the edges of 2026-01-01 (UTC and not), and coarser precisions.
WHEN = [
    "2025-12-31T23:59:59.999Z",
    "2026-01-01T00:00:00Z",
    "2026-01-01T00:00:00.000001Z",
    "2026-01-01T01:00:00+02:00",
    "2026-01-01",
    "2026-01",
    "2026-01-01T23:59:59.999999Z",
    "2026-01-02T00:00:00Z",
    "2027",
]


def _observations(patient_id: str) -> list[dict[str, Any]]:
    out = []
    for n, when in enumerate(WHEN):
        code = "8480-6" if n % 2 == 0 else "8462-4"
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final" if n % 3 else "amended",
            "code": {"coding": [{"system": LOINC, "code": code}], "text": f"Pressure {n}"},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": when,
            "valueQuantity": {
                "value": 5 + n / 100,
                "unit": "mm[Hg]",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        }
        if n % 4 == 0:
            observation["category"] = [{"coding": [{"code": "vital-signs"}]}]
        out.append(observation)
    return out


QUERIES: list[tuple[str, list[tuple[str, str]]]] = [
    ("Observation", [("patient", "{patient}"), ("code", f"{LOINC}|8480-6")]),
    ("Observation", [("patient", "Patient/{patient}"), ("date", "ge2026-01-01")]),
    ("Observation", [("subject", "Patient/{patient}"), ("date", "gt2026-01-01")]),
    ("Observation", [("patient", "{patient}"), ("date", "lt2026-01-01T00:00:00Z")]),
    ("Observation", [("patient", "{patient}"), ("date", "le2026-01-01T00:00:00Z")]),
    ("Observation", [("patient", "{patient}"), ("date", "eq2026-01-01")]),
    ("Observation", [("patient", "{patient}"), ("date", "2026-01-01T00:00:00.000001Z")]),
    ("Observation", [("patient", "{patient}"), ("date", "ne2026-01"), ("date", "sa2025")]),
    ("Observation", [("patient", "{patient}"), ("date", "eb2027"), ("date", "ap2026-01-01")]),
    ("Observation", [("patient", "{patient}"), ("value-quantity", "gt5.03")]),
    ("Observation", [("patient", "{patient}"), ("value-quantity", "5.04||mm[Hg]")]),
    ("Observation", [("patient", "{patient}"), ("code-value-quantity", "8480-6$ge5.04")]),
    ("Observation", [("code", f"{LOINC}|8462-4,{LOINC}|8480-6"), ("status:not", "amended")]),
    ("Observation", [("code:text", "pressure"), ("category:missing", "false")]),
    ("Observation", [("patient", "{patient}"), ("_sort", "date"), ("_count", "2")]),
    ("Observation", [("patient", "{patient}"), ("_sort", "-date,status"), ("_count", "3")]),
    ("Observation", [("patient", "{patient}"), ("_sort", "-value-quantity"), ("_count", "4")]),
    ("Observation", [("patient", "{patient}"), ("_sort", "-_lastUpdated,code"), ("_count", "2")]),
    ("Observation", [("patient", "{patient}"), ("code", "8480-6"), ("date", "ge2026-01-01")]),
    (
        "Observation",
        [("date", "lt2027"), ("value-quantity", "gt5.01"), ("patient", "{patient}")],
    ),
    (
        "Observation",
        [
            ("patient", "{patient}"),
            ("status:not", "amended"),
            ("category", "vital-signs"),
            ("code", f"{LOINC}|8480-6"),
            ("date", "ge2025"),
        ],
    ),
    ("Observation", [("_id", "{first},{second}"), ("date", "ge2025")]),
    ("Observation", [("_id:not", "{first}"), ("patient.name", "Ñandú")]),
    ("Observation", [("subject:Patient.family", "nandu"), ("_lastUpdated", "ge2026-11-30")]),
    ("Patient", [("_has:Observation:patient:code", "8480-6"), ("name", "Ñand")]),
    ("Patient", [("name:exact", "Ñandú"), ("_count", "1")]),
    ("Patient", [("name:contains", "AND"), ("birthdate", "ge1980-02-29")]),
    ("Patient", [("family", "nandu"), ("gender", "female,other"), ("_summary", "true")]),
]


def _values(params: list[tuple[str, str]], **names: str) -> list[tuple[str, str]]:
    return [(name, value.format(**names)) for name, value in params]


async def _through_the_reader(
    reader: ResourceReader, database: Database, query: SearchQuery
) -> Any:
    statement = page_statement(query)
    return await reader.select(statement, database.engine.dialect, prepare=query.fixed_plan)


@pytest.mark.parametrize(("resource_type", "params"), QUERIES)
def test_the_read_path_answers_a_search_as_the_unit_of_work_does(
    database: Database, resource_type: str, params: list[tuple[str, str]]
) -> None:
    tag = uuid.uuid4().hex
    patient_id = uuid.uuid4().hex
    patient = {
        "resourceType": "Patient",
        "id": patient_id,
        "name": [{"family": "Ñandú", "given": ["Ana"]}],
        "gender": "female",
        "birthDate": "1980-02-29",
    }
    batch = [patient, *_observations(patient_id)]
    for resource in batch:
        resource.setdefault("id", uuid.uuid4().hex)
        resource["meta"] = {"tag": [{"system": TAG_SYSTEM, "code": tag}]}
    with database.unit_of_work() as uow:
        ResourceRepository(uow.connection).write(batch, now=NOW)
        uow.commit()
    names = {"patient": patient_id, "first": batch[1]["id"], "second": batch[2]["id"]}
    criteria = [*_values(params, **names), ("_tag", f"{TAG_SYSTEM}|{tag}")]

    async def pages() -> tuple[list[Any], list[Any]]:
        reader = resource_reader(database.url, pool_size=2)
        await reader.open()
        try:
            expected: list[Any] = []
            answered: list[Any] = []
            cursor: str | None = None
            for _ in range(len(batch) + 1):  # every page, following the next links
                extra = [] if cursor is None else [("_page", cursor)]
                query = parse_search(resource_type, [*criteria, *extra], base=BASE, strict=True)
                assert one_statement(query)
                with database.unit_of_work(write=False) as uow:
                    rows = [tuple(row) for row in uow.connection.execute(page_statement(query))]
                expected.append(rows)
                answered.append(await _through_the_reader(reader, database, query))
                cursor = page_of(query, rows).next_cursor
                if cursor is None:
                    break
            return expected, answered
        finally:
            await reader.close()

    expected, answered = asyncio.run(pages())
    assert answered == expected, query_string(criteria)
    assert any(expected), f"{query_string(criteria)} matches nothing: it tests nothing"


SEVERAL: list[list[tuple[str, str]]] = [
    [("patient", "{patient}"), ("code", f"{LOINC}|8480-6"), ("date", "ge2026-01-01")],
    [("code", "8480-6"), ("date", "ge2026-01-01"), ("value-quantity", "gt5.01")],
    [("date", "lt2027"), ("status:not", "amended"), ("code:not", "8462-4")],
    [("subject", "Patient/{patient}"), ("status", "final"), ("code", "8462-4,8480-6")],
    [("patient", "{patient}"), ("status:not", "amended"), ("category", "vital-signs")],
    [("code-value-quantity", "8480-6$gt5"), ("date", "le2026-01-02"), ("patient", "{patient}")],
    [("patient", "{patient}"), ("date", "ge2026"), ("date", "lt2026-01-02"), ("status", "final")],
]


@pytest.mark.parametrize("params", SEVERAL)
def test_several_parameters_find_what_each_finds_alone(
    database: Database, params: list[tuple[str, str]]
) -> None:
    """However the conditions are nested (the driver's candidates, probes in probes), a search
    finds the resources every one of its parameters finds on its own."""
    tag = uuid.uuid4().hex
    patient_id = uuid.uuid4().hex
    batch = [{"resourceType": "Patient", "id": patient_id}, *_observations(patient_id)]
    batch += _observations(uuid.uuid4().hex)  # another patient's, found by some alone
    for resource in batch:
        resource.setdefault("id", uuid.uuid4().hex)
        resource["meta"] = {"tag": [{"system": TAG_SYSTEM, "code": tag}]}
    with database.unit_of_work() as uow:
        ResourceRepository(uow.connection).write(batch, now=NOW)
        uow.commit()
    criteria = _values(params, patient=patient_id)
    mine = [("_tag", f"{TAG_SYSTEM}|{tag}"), ("_count", "1000")]

    def found(search: list[tuple[str, str]]) -> set[str]:
        query = parse_search("Observation", [*search, *mine], base=BASE, strict=True)
        with database.unit_of_work(write=False) as uow:
            return {row.id for row in run_search(uow.connection, query).matches}

    alone = [found([item]) for item in criteria]
    together = found(criteria)
    assert together == set.intersection(*alone), query_string(criteria)
    assert together, f"{query_string(criteria)} matches nothing: it tests nothing"


@pytest.mark.parametrize(
    ("params", "fixed"),
    [
        ([("patient", "x"), ("code", f"{LOINC}|8480-6"), ("date", "ge2026-01-01")], True),
        ([("code", "8480-6"), ("status:not", "final"), ("_sort", "-date")], True),
        ([("subject:Patient", "x"), ("value-quantity", "gt5"), ("_count", "3")], True),
        ([("date", "ge2026-01-01"), ("value-quantity", "gt5")], False),  # ranges drive
        ([("code:text", "pressure")], False),
        ([("patient", "x"), ("code:missing", "true")], False),  # beside the driver
        ([("patient", "x"), ("_lastUpdated", "gt2026")], False),
        ([("patient", "x"), ("subject.name", "x")], False),
        ([("_id", "a,b"), ("code", "8480-6")], False),
    ],
)
def test_only_searches_driven_by_an_equality_with_every_other_condition_probing_it_are_fixed(
    params: list[tuple[str, str]], fixed: bool
) -> None:
    query = parse_search("Observation", params, base=BASE, strict=True)
    assert query.fixed_plan is fixed
