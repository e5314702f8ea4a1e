"""Concurrent facade writes on real SQLite and PostgreSQL: no duplicates, no lost updates.

Each test starts several units of work at once (threads released together by a barrier) doing
the same conditional create, conditional update or If-Match update, and checks that exactly one
resource came of it, or that exactly one version check won.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import orjson
import pytest

from service.bootstrap import Services, bootstrap
from service.config import Settings
from service.fhir.errors import PreconditionFailed, ResourceConflict
from service.fhir.search import matching_ids
from service.fhir.writes import FacadeWriter, Written, run_write
from service.store.resources import ResourceRepository

BASE = "http://testserver/fhir"
WRITERS = 8
T = TypeVar("T")


@pytest.fixture
def services(database_url: str) -> Iterator[Services]:
    built = bootstrap(Settings(database_url=database_url, database_pool_size=WRITERS))
    yield built
    built.close()


def at_once(services: Services, action: Callable[[FacadeWriter], T]) -> list[T | Exception]:
    """Run `action` in WRITERS units of work started together; results or errors, in any order."""
    barrier = threading.Barrier(WRITERS)
    results: list[T | Exception] = []
    lock = threading.Lock()

    def work() -> None:
        barrier.wait()
        try:
            outcome: T | Exception = run_write(
                services=services, base=BASE, request_id=None, action=action
            )
        except Exception as error:
            outcome = error
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=work) for _ in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == WRITERS
    return results


def observation(value: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:ehr:obs", "value": value}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "system": "http://unitsofmeasure.org", "code": "/min"},
    }


def matches(services: Services, resource_type: str, criteria: list[tuple[str, str]]) -> list[str]:
    with services.database.unit_of_work(write=False) as uow:
        return matching_ids(uow.connection, resource_type, criteria, base=BASE, limit=WRITERS)


def written(results: list[Written | Exception]) -> list[Written]:
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    return [r for r in results if isinstance(r, Written)]


def test_concurrent_conditional_creates_create_one(services: Services) -> None:
    value = uuid.uuid4().hex
    criteria = [("identifier", f"urn:ehr:obs|{value}")]
    results = written(
        at_once(
            services, lambda w: w.create("Observation", observation(value), if_none_exist=criteria)
        )
    )
    assert sum(r.created for r in results) == 1
    assert len({r.stored.id for r in results}) == 1
    assert matches(services, "Observation", criteria) == [results[0].stored.id]


def test_concurrent_conditional_creates_of_a_patient_create_one_record(
    services: Services,
) -> None:
    external = f"P-{uuid.uuid4().hex[:10]}"
    site = services.settings.site_identifier_system.rstrip("/")
    patient = {
        "resourceType": "Patient",
        "identifier": [
            {"system": f"{site}/patient", "value": external},
            {"system": services.settings.mrn_system, "value": "CLN-1"},
        ],
        "name": [{"family": "Reis", "given": ["Ines"]}],
        "gender": "female",
        "birthDate": "1990-01-01",
    }
    criteria = [("identifier", f"{site}/patient|{external}")]
    results = written(
        at_once(services, lambda w: w.create("Patient", patient, if_none_exist=criteria))
    )
    assert sum(r.created for r in results) == 1
    assert {r.stored.version for r in results} == {1}
    assert len(matches(services, "Patient", criteria)) == 1


def test_concurrent_conditional_updates_create_one_and_update_it(services: Services) -> None:
    value = uuid.uuid4().hex
    criteria = [("identifier", f"urn:ehr:obs|{value}")]
    counter = iter(range(WRITERS))
    lock = threading.Lock()

    def update(writer: FacadeWriter) -> Written:
        with lock:
            n = next(counter)
        resource = observation(value) | {"valueQuantity": {"value": 60 + n}}
        return writer.conditional_update("Observation", criteria, resource)

    results = written(at_once(services, update))
    assert sum(r.created for r in results) == 1
    assert len({r.stored.id for r in results}) == 1
    assert sorted(r.stored.version for r in results) == list(range(1, WRITERS + 1))
    assert len(matches(services, "Observation", criteria)) == 1


def test_concurrent_if_match_updates_let_exactly_one_win(services: Services) -> None:
    value = uuid.uuid4().hex
    first = run_write(
        services=services,
        base=BASE,
        request_id=None,
        action=lambda w: w.create("Observation", observation(value)),
    )
    resource_id = first.stored.id
    counter = iter(range(WRITERS))
    lock = threading.Lock()

    def update(writer: FacadeWriter) -> Written:
        with lock:
            n = next(counter)
        resource = observation(value) | {"id": resource_id, "valueQuantity": {"value": 80 + n}}
        return writer.update("Observation", resource_id, resource, if_match=1)

    results = at_once(services, update)
    wins = [r for r in results if isinstance(r, Written)]
    losses = [r for r in results if isinstance(r, PreconditionFailed)]
    assert (len(wins), len(losses)) == (1, WRITERS - 1)
    assert wins[0].stored.version == 2
    with services.database.unit_of_work(write=False) as uow:
        stored = ResourceRepository(uow.connection).read("Observation", resource_id)
    assert stored is not None
    assert stored.version == 2
    assert stored.body == wins[0].stored.body


def test_concurrent_patches_without_if_match_all_apply(services: Services) -> None:
    first = run_write(
        services=services,
        base=BASE,
        request_id=None,
        action=lambda w: w.create("Observation", observation(uuid.uuid4().hex)),
    )
    resource_id = first.stored.id
    counter = iter(range(WRITERS))
    lock = threading.Lock()

    def patch(writer: FacadeWriter) -> Written:
        with lock:
            n = next(counter)
        ops = [{"op": "add", "path": "/note/-", "value": {"text": f"note {n}"}}]
        return writer.patch("Observation", resource_id, ops)

    run_write(
        services=services,
        base=BASE,
        request_id=None,
        action=lambda w: w.patch(
            "Observation", resource_id, [{"op": "add", "path": "/note", "value": [{"text": "0"}]}]
        ),
    )
    results = written(at_once(services, patch))
    assert sorted(r.stored.version for r in results) == list(range(3, WRITERS + 3))
    with services.database.unit_of_work(write=False) as uow:
        stored = ResourceRepository(uow.connection).read("Observation", resource_id)
    assert stored is not None
    notes = orjson.loads(stored.body)["note"]
    assert sorted(note["text"] for note in notes) == sorted(
        ["0"] + [f"note {n}" for n in range(WRITERS)]
    )


def test_a_batch_of_new_resources_one_of_whose_ids_is_taken_is_a_conflict_writing_none(
    services: Services,
) -> None:
    # Batches of creates take new uuids without looking them up: the store's key still guards.
    taken = run_write(
        services=services,
        base=BASE,
        request_id=None,
        action=lambda w: w.create("Observation", observation(uuid.uuid4().hex)),
    )
    fresh = str(uuid.uuid4())

    def create_both(writer: FacadeWriter) -> list[Written]:
        return writer.create_new(
            [
                writer.new_resource("Observation", observation("fresh"), fresh),
                writer.new_resource("Observation", observation("again"), taken.stored.id),
            ]
        )

    with pytest.raises(ResourceConflict, match="id is taken"):
        run_write(services=services, base=BASE, request_id=None, action=create_both)
    with services.database.unit_of_work(write=False) as uow:
        repository = ResourceRepository(uow.connection)
        assert repository.read("Observation", fresh) is None
        kept = repository.read("Observation", taken.stored.id)
    assert kept is not None
    assert kept.version == 1
