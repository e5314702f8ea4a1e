"""What delivery reads of the store, on real SQLite and PostgreSQL: a version it already read
stands for the current body only while it is still the current version."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from mappings.context import resource_id
from service.bootstrap import Services, bootstrap
from service.config import Settings
from service.records.service import parse_record, put_record
from service.store.resources import ResourceRepository
from service.store.tables import resources
from service.sync import ledger
from tests import factory


@pytest.fixture
def services(database_url: str) -> Iterator[Services]:
    built = bootstrap(Settings(database_url=database_url, auth_disabled=True))
    yield built
    built.close()


def _write(services: Services, record: dict[str, Any]) -> None:
    with services.database.unit_of_work() as uow:
        put_record(
            uow=uow, record=parse_record(record), materializer=services.materializer, actor="t"
        )


def _current(services: Services, key: tuple[str, str]) -> tuple[int, dict[str, Any]]:
    with services.database.unit_of_work(write=False) as uow:
        row = uow.connection.execute(
            select(resources.c.version, resources.c.body).where(
                resources.c.resource_type == key[0], resources.c.id == key[1]
            )
        ).one()
    return row.version, orjson.loads(row.body)


def test_a_known_version_stands_for_the_current_body_only_while_it_is_current(
    services: Services,
) -> None:
    clinic = factory.clinic()
    for record in clinic.records():
        _write(services, record)
    patient = ("Patient", resource_id("patient", clinic.patient["external_id"]))
    condition = ("Condition", resource_id("diagnosis", clinic.diagnosis["external_id"]))
    first_version, first = _current(services, patient)
    _write(services, clinic.patient | {"name": {"given": ["Ana"], "family": "Souza"}})
    version, current = _current(services, patient)
    assert version == first_version + 1
    _, stored_condition = _current(services, condition)
    stand_in = {"resourceType": "Condition", "said": "the version already read"}

    with services.database.unit_of_work(write=False) as uow:
        found = ledger.current_bodies(
            uow.connection,
            [patient, condition, ("Patient", "nobody")],
            known={patient: (first_version, first), condition: (1, stand_in)},
        )
    # The Patient moved on: its current body is read; the Condition is still at version 1.
    assert found == {patient: current, condition: stand_in}
    assert current["name"][0]["family"] == "Souza"
    with services.database.unit_of_work(write=False) as uow:
        assert ledger.current_bodies(uow.connection, [patient, condition]) == {
            patient: current,
            condition: stored_condition,
        }

    # A deleted resource has no current body, known or not.
    with services.database.unit_of_work() as uow:
        ResourceRepository(uow.connection).delete([condition], now=datetime.now(UTC))
        uow.commit()
    with services.database.unit_of_work(write=False) as uow:
        assert (
            ledger.current_bodies(uow.connection, [condition], known={condition: (1, stand_in)})
            == {}
        )


def test_version_bodies_are_the_versions_asked_for_and_no_other(services: Services) -> None:
    first, second = factory.clinic(), factory.clinic()
    keys = []
    for clinic in (first, second):
        _write(services, clinic.patient)
        _write(services, clinic.patient | {"name": {"given": ["Ana"], "family": "Souza"}})
        keys.append(("Patient", resource_id("patient", clinic.patient["external_id"])))
    bodies = {}
    with services.database.unit_of_work(write=False) as uow:
        repository = ResourceRepository(uow.connection)
        for key in keys:
            for version in (1, 2):
                row = repository.version(key[0], key[1], version)
                assert row is not None
                assert row.body is not None
                bodies[(*key, version)] = orjson.loads(row.body)
        # Of one patient its first version, of the other its second: the ids and versions
        # asked together name two more versions, which are not the answer.
        found = ledger.version_bodies(
            uow.connection, [(*keys[0], 1), (*keys[1], 2), ("Patient", "nobody", 1)]
        )
    assert found == {keys[0]: bodies[(*keys[0], 1)], keys[1]: bodies[(*keys[1], 2)]}
    assert found[keys[0]] != bodies[(*keys[0], 2)]
