"""FHIR search semantics per parameter type, on SQLite and PostgreSQL, over the real index.

Resources are written straight into the store (the index rows come from the write path) and
each test tags its own with a random `_tag`, so tests never see one another's rows.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import insert

from service.fhir.errors import FhirError
from service.fhir.search import matching_ids, parse_search, run_search
from service.store.db import MIGRATIONS, Database
from service.store.resources import ResourceRepository
from service.store.tables import resources

BASE = "http://testserver/fhir"
TAG_SYSTEM = "urn:test:tag"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class Store:
    """Writes tagged resources and searches among them."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.tag = uuid.uuid4().hex

    def put(self, *items: dict[str, Any]) -> list[str]:
        batch = []
        for item in items:
            resource = {"id": uuid.uuid4().hex, **item}
            meta = resource.setdefault("meta", {})
            meta["tag"] = [*meta.get("tag", []), {"system": TAG_SYSTEM, "code": self.tag}]
            batch.append(resource)
        with self.database.unit_of_work() as uow:
            ResourceRepository(uow.connection).write(batch, now=NOW)
            uow.commit()
        return [r["id"] for r in batch]

    def delete(self, resource_type: str, resource_id: str) -> None:
        with self.database.unit_of_work() as uow:
            ResourceRepository(uow.connection).delete([(resource_type, resource_id)], now=NOW)
            uow.commit()

    def find(self, resource_type: str, query: str, **extra: str) -> list[str]:
        """Ids matching `query` (a FHIR query string) among this test's resources."""
        params = [tuple(p.split("=", 1)) for p in query.split("&") if p]
        params.append(("_tag", f"{TAG_SYSTEM}|{self.tag}"))
        params += list(extra.items())
        parsed = parse_search(resource_type, params, base=BASE, strict=True)  # type: ignore[arg-type]
        with self.database.unit_of_work(write=False) as uow:
            page = run_search(uow.connection, parsed)
        return [row.id for row in page.matches]


@pytest.fixture
def store(database: Database) -> Store:
    return Store(database)


def patient(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", **fields}


def observation(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", **fields}


# --- string -------------------------------------------------------------------------------------


def test_string_matches_prefixes_ignoring_case_and_accents(store: Store) -> None:
    jose, joana, maria = store.put(
        patient(name=[{"family": "Gonçalves", "given": ["José"]}]),
        patient(name=[{"family": "Reis", "given": ["Joana"]}]),
        patient(name=[{"family": "Silva", "given": ["Maria", "Joséfina"]}]),
    )
    assert sorted(store.find("Patient", "name=jo")) == sorted([jose, joana, maria])
    assert sorted(store.find("Patient", "name=JOSE")) == sorted([jose, maria])
    assert store.find("Patient", "family=goncalves") == [jose]
    assert store.find("Patient", "family=onçal") == []


def test_string_exact_and_contains(store: Store) -> None:
    (jose,) = store.put(patient(name=[{"family": "Gonçalves", "given": ["José"]}]))
    assert store.find("Patient", "family:exact=Gonçalves") == [jose]
    assert store.find("Patient", "family:exact=goncalves") == []
    assert store.find("Patient", "family:exact=Gonç") == []
    assert store.find("Patient", "family:contains=ONCAL") == [jose]
    assert store.find("Patient", "family:contains=50%") == []


def test_comma_is_or_and_repeated_parameters_are_and(store: Store) -> None:
    ana, rui = store.put(
        patient(name=[{"family": "Silva", "given": ["Ana"]}]),
        patient(name=[{"family": "Costa", "given": ["Rui"]}]),
    )
    assert sorted(store.find("Patient", "family=silva,costa")) == sorted([ana, rui])
    assert store.find("Patient", "family=silva&given=ana") == [ana]
    assert store.find("Patient", "family=silva&given=rui") == []


# --- token --------------------------------------------------------------------------------------


def test_token_code_system_and_code_forms(store: Store) -> None:
    loinc, local, plain = store.put(
        observation(code={"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}),
        observation(code={"coding": [{"system": "urn:local", "code": "8867-4"}]}),
        observation(code={"coding": [{"code": "8867-4"}], "text": "Heart rate"}),
    )
    assert sorted(store.find("Observation", "code=8867-4")) == sorted([loinc, local, plain])
    assert store.find("Observation", "code=http://loinc.org|8867-4") == [loinc]
    assert store.find("Observation", "code=|8867-4") == [plain]
    assert store.find("Observation", "code=urn:local|") == [local]
    assert sorted(store.find("Observation", "code:not=http://loinc.org|8867-4")) == sorted(
        [local, plain]
    )
    assert store.find("Observation", "code:text=heart") == [plain]


def test_token_on_identifier_boolean_and_code(store: Store) -> None:
    alive, dead = store.put(
        patient(identifier=[{"system": "urn:mrn", "value": "A-1"}], gender="female", active=True),
        patient(identifier=[{"system": "urn:mrn", "value": "A-2"}], deceasedBoolean=True),
    )
    assert store.find("Patient", "identifier=urn:mrn|A-1") == [alive]
    assert store.find("Patient", "identifier=A-2") == [dead]
    assert store.find("Patient", "gender=female") == [alive]
    assert store.find("Patient", "active=true") == [alive]
    assert store.find("Patient", "deceased=true") == [dead]


def test_missing_modifier(store: Store) -> None:
    with_gender, without = store.put(patient(gender="male"), patient())
    assert store.find("Patient", "gender:missing=true") == [without]
    assert store.find("Patient", "gender:missing=false") == [with_gender]


def test_id_and_profile(store: Store) -> None:
    one, two = store.put(
        patient(meta={"profile": ["http://example.org/p"]}),
        patient(),
    )
    assert store.find("Patient", f"_id={one},{two}") == sorted([one, two])
    assert store.find("Patient", "_profile=http://example.org/p") == [one]


# --- date ---------------------------------------------------------------------------------------


def dated(value: str | dict[str, str]) -> dict[str, Any]:
    key = "effectivePeriod" if isinstance(value, dict) else "effectiveDateTime"
    return observation(**{key: value})


def test_date_precision_and_prefixes(store: Store) -> None:
    morning, evening, next_day = store.put(
        dated("2026-10-05T09:00:00+00:00"),
        dated("2026-10-05T21:30:00+00:00"),
        dated("2026-10-06"),
    )
    assert store.find("Observation", "date=2026-10-05") == sorted([morning, evening])
    assert sorted(store.find("Observation", "date=2026-10")) == sorted([morning, evening, next_day])
    assert store.find("Observation", "date=2026-10-05T09:00") == [morning]
    assert store.find("Observation", "date=gt2026-10-05") == [next_day]
    assert store.find("Observation", "date=ge2026-10-06") == [next_day]
    assert sorted(store.find("Observation", "date=lt2026-10-06")) == sorted([morning, evening])
    assert store.find("Observation", "date=le2026-10-05T09:00:00Z") == [morning]
    assert sorted(store.find("Observation", "date=ne2026-10-05")) == [next_day]
    assert store.find("Observation", "date=sa2026-10-05") == [next_day]
    assert sorted(store.find("Observation", "date=eb2026-10-06")) == sorted([morning, evening])


def test_date_time_zones_are_compared_in_utc(store: Store) -> None:
    (late,) = store.put(dated("2026-10-05T22:30:00-04:00"))  # 02:30 UTC on the 6th
    assert store.find("Observation", "date=2026-10-06") == [late]
    assert store.find("Observation", "date=2026-10-05") == []
    assert store.find("Observation", "date=ge2026-10-06T02:30:00Z") == [late]


def test_date_periods_overlap_and_open_ends(store: Store) -> None:
    closed, open_ended = store.put(
        dated({"start": "2026-10-01", "end": "2026-10-10"}),
        dated({"start": "2026-10-08"}),
    )
    # eq: the resource's range lies within the search range.
    assert store.find("Observation", "date=2026-10") == [closed]
    # gt / lt: some part of the resource's range lies after / before the value.
    assert sorted(store.find("Observation", "date=gt2026-10-09")) == sorted([closed, open_ended])
    assert store.find("Observation", "date=lt2026-10-02") == [closed]
    assert store.find("Observation", "date=gt2027-01-01") == [open_ended]
    assert store.find("Observation", "date=sa2026-10-07") == [open_ended]


def test_last_updated(store: Store) -> None:
    (one,) = store.put(patient())
    assert store.find("Patient", "_lastUpdated=2026-11-30") == [one]
    assert store.find("Patient", "_lastUpdated=gt2026-11-30") == []
    assert store.find("Patient", "_lastUpdated=ge2026-11-30T12:00:00Z") == [one]


def test_a_malformed_date_is_an_error_naming_the_parameter(database: Database) -> None:
    with pytest.raises(FhirError) as raised:
        parse_search("Observation", [("date", "ge2026-13-45x")], base=BASE, strict=True)
    assert raised.value.status == 400
    assert "date" in raised.value.diagnostics


# --- quantity -----------------------------------------------------------------------------------


def quantity(value: float, code: str = "/min") -> dict[str, Any]:
    return observation(
        valueQuantity={
            "value": value,
            "unit": code,
            "system": "http://unitsofmeasure.org",
            "code": code,
        }
    )


def test_quantity_prefixes_precision_and_units(store: Store) -> None:
    low, mid, high, other_unit = store.put(
        quantity(54.4), quantity(55.04), quantity(72), quantity(55, "kg")
    )
    assert sorted(store.find("Observation", "value-quantity=55")) == sorted([mid, other_unit])
    assert store.find("Observation", "value-quantity=55.0||/min") == [mid]
    assert store.find("Observation", "value-quantity=55|http://unitsofmeasure.org|/min") == [mid]
    assert store.find("Observation", "value-quantity=55||kg") == [other_unit]
    assert store.find("Observation", "value-quantity=gt60") == [high]
    assert sorted(store.find("Observation", "value-quantity=le55||/min")) == [low]
    assert sorted(store.find("Observation", "value-quantity=ap70")) == [high]


# --- reference ----------------------------------------------------------------------------------


def test_reference_forms_and_type_modifier(store: Store) -> None:
    ana, rui = store.put(patient(), patient())
    mine, theirs, external = store.put(
        observation(subject={"reference": f"Patient/{ana}"}),
        observation(subject={"reference": f"Patient/{rui}"}),
        observation(subject={"reference": "https://ehr.example.org/fhir/Patient/77"}),
    )
    assert store.find("Observation", f"subject=Patient/{ana}") == [mine]
    assert store.find("Observation", f"subject={ana}") == [mine]
    assert store.find("Observation", f"patient={rui}") == [theirs]
    assert store.find("Observation", f"subject:Patient={ana}") == [mine]
    assert store.find("Observation", f"subject={BASE}/Patient/{ana}") == [mine]
    assert store.find("Observation", "subject=https://ehr.example.org/fhir/Patient/77") == [
        external
    ]
    assert store.find("Observation", f"subject:Group={ana}") == []


def test_chaining_and_has(store: Store) -> None:
    ana, rui = store.put(
        patient(identifier=[{"system": "urn:mrn", "value": "X-1"}], name=[{"family": "Silva"}]),
        patient(identifier=[{"system": "urn:mrn", "value": "X-2"}], name=[{"family": "Costa"}]),
    )
    heart, weight = store.put(
        observation(
            subject={"reference": f"Patient/{ana}"},
            code={"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        ),
        observation(
            subject={"reference": f"Patient/{rui}"},
            code={"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        ),
    )
    assert store.find("Observation", "subject:Patient.identifier=urn:mrn|X-1") == [heart]
    assert store.find("Observation", "patient.family=costa") == [weight]
    assert store.find("Patient", "_has:Observation:patient:code=8867-4") == [ana]
    assert store.find("Patient", "_has:Observation:subject:code=29463-7") == [rui]


def test_deleted_resources_are_not_found(store: Store) -> None:
    gone, kept = store.put(patient(gender="male"), patient(gender="male"))
    store.delete("Patient", gone)
    assert store.find("Patient", "gender=male") == [kept]


def test_an_update_replaces_the_index_rows(store: Store) -> None:
    (one,) = store.put(patient(gender="male"))
    with store.database.unit_of_work() as uow:
        ResourceRepository(uow.connection).write(
            [
                patient(
                    id=one,
                    gender="female",
                    meta={"tag": [{"system": TAG_SYSTEM, "code": store.tag}]},
                )
            ],
            now=NOW,
        )
        uow.commit()
    assert store.find("Patient", "gender=male") == []
    assert store.find("Patient", "gender=female") == [one]


# --- composite ----------------------------------------------------------------------------------

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SYSTOLIC, DIASTOLIC = "8480-6", "8462-4"


def concept(code: str, system: str = LOINC) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def blood_pressure(systolic: float, diastolic: float) -> dict[str, Any]:
    def part(code: str, value: float) -> dict[str, Any]:
        mmhg = {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}
        return {"code": concept(code), "valueQuantity": mmhg}

    return observation(
        code=concept("85354-9"),
        component=[part(SYSTOLIC, systolic), part(DIASTOLIC, diastolic)],
    )


def test_component_composites_match_both_parts_on_the_same_component(store: Store) -> None:
    normal, low = store.put(blood_pressure(120, 80), blood_pressure(85, 60))
    find = store.find
    # The diastolic 80 is below 90, but it is not the systolic component's value.
    assert find("Observation", f"component-code-value-quantity={LOINC}|{SYSTOLIC}$lt90") == [low]
    assert find("Observation", f"component-code-value-quantity={SYSTOLIC}$gt100") == [normal]
    assert find("Observation", f"component-code-value-quantity={DIASTOLIC}$80") == [normal]
    assert find("Observation", f"component-code-value-quantity={SYSTOLIC}$120|{UCUM}|mm[Hg]") == [
        normal
    ]
    assert find("Observation", f"component-code-value-quantity={SYSTOLIC}$120||kg") == []
    either = f"component-code-value-quantity={SYSTOLIC}$gt100,{DIASTOLIC}$lt70"
    assert sorted(find("Observation", either)) == sorted([normal, low])
    both = f"component-code-value-quantity={SYSTOLIC}$gt100&component-code-value-quantity="
    assert find("Observation", both + f"{DIASTOLIC}$lt85") == [normal]
    assert find("Observation", both + f"{DIASTOLIC}$lt70") == []
    # Observation.code and value[x] are not a component: only combo- looks at both.
    assert find("Observation", f"code-value-quantity={SYSTOLIC}$gt100") == []
    assert find("Observation", f"combo-code-value-quantity={SYSTOLIC}$gt100") == [normal]
    assert find("Observation", f"component-code-value-quantity={SYSTOLIC}$ne120") == [low]


def test_code_value_composites_pair_the_code_with_the_value(store: Store) -> None:
    weight, positive, dated_one, period, text = store.put(
        observation(code=concept("29463-7"), valueQuantity={"value": 72, "code": "kg"}),
        observation(code=concept("94500-6"), valueCodeableConcept=concept("10828004", "urn:sct")),
        observation(code=concept("8665-2"), valueDateTime="2026-03-04"),
        observation(code=concept("8665-2"), valuePeriod={"start": "2026-05-01"}),
        observation(code=concept("8251-1"), valueString="Straße Nord"),
    )
    find = store.find
    assert find("Observation", "code-value-quantity=29463-7$gt70") == [weight]
    assert find("Observation", "code-value-quantity=29463-7$lt70") == []
    assert find("Observation", "code-value-quantity=8665-2$gt70") == []
    assert find("Observation", "combo-code-value-quantity=29463-7$72||kg") == [weight]
    assert find("Observation", f"code-value-concept={LOINC}|94500-6$urn:sct|10828004") == [positive]
    assert find("Observation", "code-value-concept=94500-6$260385009") == []
    assert find("Observation", "combo-code-value-concept=94500-6$10828004") == [positive]
    assert find("Observation", "code-value-date=8665-2$2026-03") == [dated_one]
    assert find("Observation", "code-value-date=8665-2$ge2026-04") == [period]
    assert find("Observation", "code-value-date=29463-7$ge2026-04") == []
    assert find("Observation", "code-value-string=8251-1$strasse") == [text]
    assert find("Observation", "code-value-string=8251-1$nord") == []


def test_composite_values_escape_the_separators(store: Store) -> None:
    (one,) = store.put(observation(code=concept("8251-1"), valueString="a$b, c"))
    assert store.find("Observation", "code-value-string=8251-1$a\\$b\\, c") == [one]
    assert store.find("Observation", "code-value-string=8251-1$a\\$c,8251-1$a\\$") == [one]


def test_composite_missing_chaining_and_has(store: Store) -> None:
    (ana,) = store.put(patient())
    pressure, weight = store.put(
        blood_pressure(150, 95) | {"subject": {"reference": f"Patient/{ana}"}},
        observation(code=concept("29463-7"), valueQuantity={"value": 72, "code": "kg"}),
    )
    missing = "component-code-value-quantity:missing"
    assert store.find("Observation", f"{missing}=true") == [weight]
    assert store.find("Observation", f"{missing}=false") == [pressure]
    assert store.find(
        "Patient", f"_has:Observation:patient:combo-code-value-quantity={SYSTOLIC}$gt140"
    ) == [ana]
    assert (
        store.find(
            "Patient", f"_has:Observation:patient:combo-code-value-quantity={SYSTOLIC}$lt140"
        )
        == []
    )


def test_an_update_replaces_the_composite_rows(store: Store) -> None:
    (one,) = store.put(blood_pressure(120, 80))
    with store.database.unit_of_work() as uow:
        updated = blood_pressure(100, 70) | {"id": one}
        updated["meta"] = {"tag": [{"system": TAG_SYSTEM, "code": store.tag}]}
        ResourceRepository(uow.connection).write([updated], now=NOW)
        uow.commit()
    assert store.find("Observation", f"component-code-value-quantity={SYSTOLIC}$120") == []
    assert store.find("Observation", f"component-code-value-quantity={SYSTOLIC}$100") == [one]
    store.delete("Observation", one)
    assert store.find("Observation", f"component-code-value-quantity={SYSTOLIC}$100") == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("component-code-value-quantity", SYSTOLIC),
        ("component-code-value-quantity", f"{SYSTOLIC}$1$2"),
        ("component-code-value-quantity", f"{SYSTOLIC}$"),
        ("component-code-value-quantity", "$90"),
        ("component-code-value-quantity", f"{SYSTOLIC}$high"),
        ("component-code-value-quantity", f"{SYSTOLIC}$90,"),
        ("code-value-date", "8665-2$yesterday"),
        ("component-code-value-quantity:exact", f"{SYSTOLIC}$90"),
        ("component-code-value-quantity:missing", "maybe"),
    ],
)
def test_malformed_composites_are_errors_naming_the_parameter(name: str, value: str) -> None:
    with pytest.raises(FhirError) as raised:
        parse_search("Observation", [(name, value)], base=BASE, strict=True)
    assert raised.value.status == 400
    assert name in raised.value.diagnostics


def test_sorting_by_a_composite_is_refused() -> None:
    with pytest.raises(FhirError):
        parse_search("Observation", [("_sort", "code-value-quantity")], base=BASE, strict=True)


def test_the_index_migrations_index_resources_stored_before_them(empty_url: str) -> None:
    """A store from before the search index: 0003 backfills its tables while the composite
    table is not there yet, and 0011 the composites."""
    database = Database(empty_url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with database.unit_of_work() as uow:
            config.attributes["connection"] = uow.connection
            command.upgrade(config, "0002")
            body = blood_pressure(120, 80) | {"id": "bp-before", "meta": {"versionId": "1"}}
            uow.connection.execute(
                insert(resources).values(
                    resource_type="Observation",
                    id="bp-before",
                    version=1,
                    last_updated=NOW,
                    deleted=False,
                    content_hash="0" * 64,
                    body=orjson.dumps(body).decode(),
                )
            )
            uow.commit()
        database.migrate()
        with database.unit_of_work(write=False) as uow:
            for param, expected in (
                (("component-code-value-quantity", f"{SYSTOLIC}$120"), ["bp-before"]),
                (("component-code-value-quantity", f"{SYSTOLIC}$lt90"), []),
                (("code", "85354-9"), ["bp-before"]),
            ):
                query = parse_search("Observation", [param], base=BASE, strict=True)
                assert [row.id for row in run_search(uow.connection, query).matches] == expected
    finally:
        database.dispose()


# --- sorting, paging, includes --------------------------------------------------------------------


def test_sort_on_several_keys_with_missing_values_last(store: Store) -> None:
    ids = store.put(
        patient(gender="male", birthDate="1980-01-01"),
        patient(gender="female", birthDate="1990-01-01"),
        patient(gender="female", birthDate="1970-01-01"),
        patient(birthDate="1985-01-01"),
    )
    male, young_female, old_female, unknown = ids
    assert store.find("Patient", "", _sort="gender,-birthdate") == [
        young_female,
        old_female,
        male,
        unknown,
    ]
    assert store.find("Patient", "", _sort="-gender,birthdate") == [
        male,
        old_female,
        young_female,
        unknown,
    ]


def pages(
    database: Database, resource_type: str, params: list[tuple[str, str]]
) -> Iterator[list[str]]:
    query = parse_search(resource_type, params, base=BASE, strict=True)
    while True:
        with database.unit_of_work(write=False) as uow:
            page = run_search(uow.connection, query)
        yield [row.id for row in page.matches]
        if page.next_cursor is None:
            return
        query = parse_search(
            resource_type, [*params, ("_page", page.next_cursor)], base=BASE, strict=True
        )


@pytest.mark.parametrize("sort", [None, "-birthdate", "family,_id"])
def test_paging_under_concurrent_writes_neither_skips_nor_repeats(
    store: Store, sort: str | None
) -> None:
    originals = store.put(
        *(
            patient(birthDate=f"19{50 + i % 40}-01-0{1 + i % 9}", name=[{"family": f"F{i % 7}"}])
            for i in range(57)
        )
    )
    params = [("_tag", f"{TAG_SYSTEM}|{store.tag}"), ("_count", "8")]
    if sort:
        params.append(("_sort", sort))
    seen: list[str] = []
    stop = threading.Event()

    def write_meanwhile() -> None:
        for _ in range(30):  # bounded: a write now and then while the pages are read
            if stop.wait(0.01):
                return
            store.put(patient(birthDate="1975-05-05", name=[{"family": "F3"}]))

    writer = threading.Thread(target=write_meanwhile)
    writer.start()
    try:
        for page in pages(store.database, "Patient", params):
            seen += page
            store.put(patient(birthDate="1960-01-01", name=[{"family": "F1"}]))
    finally:
        stop.set()
        writer.join()
    assert len(seen) == len(set(seen)), "a page repeated an entry"
    assert set(originals) <= set(seen), "a page skipped an entry"


def test_include_revinclude_and_iterate(database: Database) -> None:
    store = Store(database)
    (ana,) = store.put(patient(managingOrganization={"reference": "Organization/org-x"}))
    store.put({"resourceType": "Organization", "id": "org-x", "name": "Clinic"})
    (obs,) = store.put(observation(subject={"reference": f"Patient/{ana}"}))
    (prov,) = store.put(
        {
            "resourceType": "Provenance",
            "target": [{"reference": f"Observation/{obs}"}],
            "recorded": "2026-11-30T12:00:00+00:00",
            "agent": [{"who": {"reference": "Organization/org-x"}}],
        }
    )
    params = [
        ("_tag", f"{TAG_SYSTEM}|{store.tag}"),
        ("_include", "Observation:subject"),
        ("_include", "Patient:organization:iterate"),
        ("_revinclude", "Provenance:target"),
    ]
    query = parse_search("Observation", params, base=BASE, strict=True)
    with database.unit_of_work(write=False) as uow:
        page = run_search(uow.connection, query)
    assert [row.id for row in page.matches] == [obs]
    assert sorted((r.resource_type, r.id) for r in page.included) == sorted(
        [("Patient", ana), ("Provenance", prov), ("Organization", "org-x")]
    )


def test_total_summary_count_and_accurate(store: Store) -> None:
    store.put(*(patient(gender="other") for _ in range(5)))
    tag = ("_tag", f"{TAG_SYSTEM}|{store.tag}")
    for extra, expected_total, expected_rows in (
        ([("_summary", "count")], 5, 0),
        ([("_count", "0")], 5, 0),
        ([("_count", "2"), ("_total", "accurate")], 5, 2),
        ([("_count", "2")], None, 2),
        ([("_count", "10")], 5, 5),
        ([("_count", "10"), ("_total", "none")], None, 5),
    ):
        query = parse_search("Patient", [tag, *extra], base=BASE, strict=True)
        with store.database.unit_of_work(write=False) as uow:
            page = run_search(uow.connection, query)
        assert (page.total, len(page.matches)) == (expected_total, expected_rows), extra


# --- errors and handling ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("nonsense", "1"),
        ("gender:exact", "male"),
        ("birthdate", "yesterday"),
        ("_sort", "nonsense"),
        ("_count", "-1"),
        ("_include", "Observation"),
        ("_summary", "maybe"),
        ("general-practitioner.name.family", "x"),
        ("_has:Observation:patient", "x"),
        ("_page", "not-a-token"),
        ("family", ""),
    ],
)
def test_strict_handling_rejects_what_it_cannot_apply(name: str, value: str) -> None:
    with pytest.raises(FhirError) as raised:
        parse_search("Patient", [(name, value)], base=BASE, strict=True)
    assert raised.value.status == 400


def test_lenient_handling_reports_and_leaves_out(store: Store) -> None:
    query = parse_search(
        "Patient", [("gender", "male"), ("nonsense", "1")], base=BASE, strict=False
    )
    assert query.applied == [("gender", "male")]
    assert [name for name, _ in query.ignored] == ["nonsense"]


def test_matching_ids_for_conditional_interactions(store: Store) -> None:
    (one,) = store.put(patient(identifier=[{"system": "urn:mrn", "value": "C-1"}]))
    criteria = [("identifier", "urn:mrn|C-1"), ("_tag", f"{TAG_SYSTEM}|{store.tag}")]
    with store.database.unit_of_work(write=False) as uow:
        assert matching_ids(uow.connection, "Patient", criteria, base=BASE) == [one]
        with pytest.raises(FhirError):
            matching_ids(uow.connection, "Patient", [("nonsense", "1")], base=BASE)
        with pytest.raises(FhirError):
            matching_ids(uow.connection, "Patient", [("_count", "1")], base=BASE)


def test_values_longer_than_the_index_holds_are_stored_and_found_by_their_start(
    store: Store,
) -> None:
    long_value = "V" * 5000
    (one,) = store.put(
        patient(
            identifier=[{"system": "urn:" + "s" * 3000, "value": long_value}],
            managingOrganization={"reference": "https://ehr.example.org/" + "o" * 4000},
            name=[{"family": "F" * 4000}],
        )
    )
    assert store.find("Patient", f"family={'f' * 300}") == [one]
    assert store.find("Patient", f"identifier={long_value[:256]}") == [one]
