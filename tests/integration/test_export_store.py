"""The export queries on real SQLite and PostgreSQL: snapshots, keyset pages, compartments.

The resources here are written in 1990, so a snapshot taken then sees only them (everything
the other tests store is newer); they are removed again afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import delete

from service.fhir.search_parameters import compartment_sources
from service.store.db import Database
from service.store.export import (
    ExportJob,
    ExportJobs,
    everything_page,
    snapshot_count,
    snapshot_pages,
)
from service.store.resources import ResourceRepository
from service.store.tables import (
    export_jobs,
    outbox,
    resource_versions,
    resources,
    search_composite,
    search_date,
    search_quantity,
    search_reference,
    search_string,
    search_token,
)

BEFORE = datetime(1990, 1, 1, 8, tzinfo=UTC)
SNAPSHOT = datetime(1990, 1, 2, 8, tzinfo=UTC)
AFTER = datetime(1990, 1, 3, 8, tzinfo=UTC)
COMPARTMENT = compartment_sources()


def _patient(pid: str, gender: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": gender}


def _observation(oid: str, patient: str, performer: str | None = None) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"text": "heart rate"},
        "subject": {"reference": f"Patient/{patient}"},
    }
    if performer is not None:
        observation["performer"] = [{"reference": f"Practitioner/{performer}"}]
    return observation


class World:
    """Two patients written before the snapshot, and changes after it."""

    def __init__(self, database: Database) -> None:
        self.database = database
        tag = uuid.uuid4().hex[:8]
        self.a, self.b, self.new = f"pa-{tag}", f"pb-{tag}", f"pn-{tag}"
        self.oa, self.ob, self.gone, self.onew = (f"o{x}-{tag}" for x in ("a", "b", "g", "n"))
        self.doctor = f"dr-{tag}"
        self.keys = [
            ("Patient", self.a),
            ("Patient", self.b),
            ("Patient", self.new),
            ("Observation", self.oa),
            ("Observation", self.ob),
            ("Observation", self.gone),
            ("Observation", self.onew),
            ("Practitioner", self.doctor),
        ]
        with database.unit_of_work() as uow:
            repository = ResourceRepository(uow.connection)
            repository.write(
                [
                    _patient(self.a, "female"),
                    _patient(self.b, "male"),
                    _observation(self.oa, self.a, self.doctor),
                    _observation(self.ob, self.b),
                    _observation(self.gone, self.a),
                    {"resourceType": "Practitioner", "id": self.doctor},
                ],
                now=BEFORE,
            )
            repository.write(
                [
                    _patient(self.a, "other"),
                    _patient(self.new, "female"),
                    _observation(self.onew, self.a),
                ],
                now=AFTER,
            )
            repository.delete([("Observation", self.gone)], now=AFTER)
            uow.commit()

    def job(self, *, level: str = "system", since: datetime | None = None) -> ExportJob:
        with self.database.unit_of_work() as uow:
            job = ExportJobs(uow.connection).create(
                job_id=str(uuid.uuid4()),
                level=level,
                request="http://testserver/fhir/$export",
                types=["Patient", "Observation", "Practitioner"],
                since=since,
                now=SNAPSHOT,
            )
            uow.commit()
        return job

    def remove(self) -> None:
        ids = [key[1] for key in self.keys]
        with self.database.unit_of_work() as uow:
            for table in (resources, resource_versions):
                uow.connection.execute(delete(table).where(table.c.id.in_(ids)))
            uow.connection.execute(delete(outbox).where(outbox.c.resource_id.in_(ids)))
            for index in (
                search_string,
                search_token,
                search_date,
                search_reference,
                search_quantity,
                search_composite,
            ):
                uow.connection.execute(delete(index).where(index.c.resource_id.in_(ids)))
            uow.connection.execute(
                delete(export_jobs).where(export_jobs.c.transaction_time == SNAPSHOT)
            )
            uow.commit()


@pytest.fixture
def world(database: Database) -> Iterator[World]:
    world = World(database)
    try:
        yield world
    finally:
        world.remove()


def _file(world: World, job: ExportJob, resource_type: str, page_size: int = 1000) -> list[Any]:
    pages = list(
        snapshot_pages(
            database=world.database,
            job=job,
            resource_type=resource_type,
            compartment=COMPARTMENT,
            page_size=page_size,
        )
    )
    assert all(len(page) <= page_size for page in pages)
    return [orjson.loads(body) for page in pages for body in page]


def _count(world: World, job: ExportJob, resource_type: str) -> int:
    with world.database.unit_of_work(write=False) as uow:
        return snapshot_count(
            connection=uow.connection, job=job, resource_type=resource_type, compartment=COMPARTMENT
        )


def test_a_snapshot_serves_the_versions_current_at_its_instant(world: World) -> None:
    job = world.job()
    patients = _file(world, job, "Patient")
    assert [(p["id"], p["gender"], p["meta"]["versionId"]) for p in patients] == sorted(
        [(world.a, "female", "1"), (world.b, "male", "1")]
    )
    observations = {o["id"] for o in _file(world, job, "Observation")}
    # The one deleted after the snapshot is in it; the one created after is not.
    assert observations == {world.oa, world.ob, world.gone}
    assert [p["id"] for p in _file(world, job, "Practitioner")] == [world.doctor]
    for resource_type, expected in (("Patient", 2), ("Observation", 3), ("Practitioner", 1)):
        assert _count(world, job, resource_type) == expected


def test_files_are_read_in_keyset_pages(world: World) -> None:
    job = world.job()
    whole = _file(world, job, "Observation")
    pages = list(
        snapshot_pages(
            database=world.database,
            job=job,
            resource_type="Observation",
            compartment=COMPARTMENT,
            page_size=1,
        )
    )
    assert [len(page) for page in pages] == [1, 1, 1]
    assert [orjson.loads(page[0]) for page in pages] == whole
    assert _file(world, job, "Observation", page_size=2) == whole


def test_since_applies_to_the_snapshot_version(world: World) -> None:
    job = world.job(since=BEFORE + timedelta(seconds=1))
    assert _file(world, job, "Patient") == []
    assert _count(world, job, "Observation") == 0


def test_patient_level_keeps_compartment_members_by_current_index(world: World) -> None:
    job = world.job(level="patient")
    assert {p["id"] for p in _file(world, job, "Patient")} == {world.a, world.b}
    # Membership comes from the index of current versions: the observation deleted after the
    # snapshot has no index rows left, so a Patient-level export leaves it out.
    assert {o["id"] for o in _file(world, job, "Observation")} == {world.oa, world.ob}
    assert _file(world, job, "Practitioner") == []
    assert _count(world, job, "Observation") == 2


def test_everything_pages_through_one_patient(world: World) -> None:
    seen: list[tuple[str, str]] = []
    after: tuple[str, str] | None = None
    while True:
        with world.database.unit_of_work(write=False) as uow:
            rows = everything_page(
                connection=uow.connection,
                patient_id=world.a,
                compartment=COMPARTMENT,
                referenced_types=("Organization", "Practitioner"),
                types=None,
                since=None,
                after=after,
                limit=2,
            )
        if not rows:
            break
        seen += [(row.resource_type, row.id) for row in rows]
        after = (rows[-1].resource_type, rows[-1].id)
    assert seen == sorted(
        [
            ("Observation", world.oa),
            ("Observation", world.onew),
            ("Patient", world.a),
            ("Practitioner", world.doctor),
        ]
    )
