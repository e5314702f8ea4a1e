"""Delivery's translation on JSON bytes gives, byte for byte, what translating element by
element gives: over every resource a demo clinic maps to, with targets in the Bundle, held by
the EHR, or neither, references with escapes, and `contained` resources left alone."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from datetime import date
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest

from mappings.bundle import map_records
from service.cli import mapping_context
from service.config import Settings
from service.json_text import dump_json, load_json
from service.records.demo import generate_clinic
from service.sync.outbound import (
    UnresolvedPatient,
    bundle_full_url,
    identifier_query,
    referenced_keys,
    relative_key,
    translate,
    translate_json,
)

Key = tuple[str, str]
Resource = dict[str, Any]


def walk(value: Any) -> list[dict[str, Any]]:
    """Reference-like dicts in document order, outside `contained`: the walk, recursively."""
    if isinstance(value, list):
        return [ref for item in value for ref in walk(item)]
    if not isinstance(value, dict):
        return []
    found = [value] if isinstance(value.get("reference"), str) else []
    for key, item in value.items():
        if key != "contained":
            found += walk(item)
    return found


def translated_element_by_element(
    resource: Resource,
    *,
    remote_id: str | None,
    remote_of: Callable[[Key], str | None],
    identifier_of: Callable[[Key], dict[str, str] | None],
    in_bundle: frozenset[Key],
) -> Resource:
    """What the worker sent before translation moved onto the bytes (its code as it was)."""
    out: Resource = orjson.loads(orjson.dumps(resource))
    meta = dict(out.get("meta") or {})
    for name in ("versionId", "lastUpdated", "source"):
        meta.pop(name, None)
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    if remote_id is None:
        out.pop("id", None)
    else:
        out["id"] = remote_id
    for ref in walk(out):
        key = relative_key(ref["reference"])
        if key is None:
            continue
        if key in in_bundle:
            ref["reference"] = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, '/'.join(key))}"
            continue
        found = remote_of(key)
        if found is not None:
            ref["reference"] = f"{key[0]}/{found}"
            continue
        if key[0] == "Patient":
            raise UnresolvedPatient(key[1])
        del ref["reference"]
        identifier = ref.get("identifier") or identifier_of(key)
        if identifier is not None:
            ref["identifier"] = identifier
            ref.setdefault("type", key[0])
        if not ref.get("identifier") and not ref.get("display"):
            ref["display"] = f"{key[0]} kept by the infusion clinic"
    return out


def clinic_resources() -> list[Resource]:
    records = generate_clinic(seed=11, patients=2, as_of=date(2026, 11, 23))
    context = mapping_context(Settings())
    return [orjson.loads(orjson.dumps(r)) for r in map_records(records, context=context)]


RESOURCES = clinic_resources()


def odd_resources() -> list[Resource]:
    """Shapes the clinic's mappings do not make but clients may store."""
    return [
        {
            "resourceType": "Observation",
            "id": "o1",
            "meta": {"versionId": "2", "lastUpdated": "2026-01-01T00:00:00Z"},
            "contained": [
                {"resourceType": "Practitioner", "id": "c", "x": {"reference": "Patient/p1"}}
            ],
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "#c"}, {"reference": "Practitioner/c1"}],
        },
        {
            "resourceType": "Observation",
            "id": "o2",
            "subject": {"reference": "Patient/p1", "display": 'Ana "the patient" \\ Silva'},
            "note": [{"text": '{"reference":"Patient/p9"} is only text'}],
            "focus": [{"reference": "Observation/\u00e9t\u00e9"}, {"reference": 'Condition/a"b'}],
            "derivedFrom": [
                {"reference": "http://elsewhere.example/fhir/Observation/1"},
                {"reference": "Observation/o2", "identifier": {"system": "s", "value": "v"}},
                {"reference": "Goal/g1", "display": "kept"},
                {"reference": "Goal/g2", "display": ""},
                {"reference": "Goal/g3", "display": "x", "type": "Goal"},
            ],
            "extension": [{"url": "u", "valueReference": {"reference": "Encounter/e1"}}],
        },
        {"resourceType": "Basic", "id": "b", "meta": {"source": "x"}, "subject": {"reference": 7}},
        {
            "resourceType": "Basic",
            "id": "b2",
            "author": {"reference": "Practitioner/c\\1", "display": 'Dr "Reis"'},
            "extension": [
                {"url": "u", "valueReference": {"reference": "Goal/g2", "display": ""}},
                {"url": "v", "valueReference": {"reference": "Organization/o"}},
                {"url": "w", "valueReference": {"type": "Goal", "reference": "Goal/g4"}},
            ],
        },
    ]


def patients_of(resources: list[Resource]) -> set[Key]:
    return {k for r in resources for k in referenced_keys(r) if k[0] == "Patient"}


@pytest.mark.parametrize("seed", range(12))
def test_bytes_translation_is_element_by_element_translation(seed: int) -> None:
    chooser = random.Random(seed)
    resources = RESOURCES + odd_resources()
    targets = {k for r in resources for k in referenced_keys(r)} | {
        ("Patient", "p1"),
        ("Observation", "\u00e9t\u00e9"),
        ("Condition", 'a"b'),
    }
    # In sorted order: a set's order changes with the process's hash seed, and with it what
    # the seed's choices fall on.
    held = {k: f"ehr-{chooser.randrange(10**6)}" for k in sorted(targets) if chooser.random() < 0.5}
    for patient in sorted(patients_of(resources) | {("Patient", "p1")}):
        if seed % 4:  # now and then the patient is not matched
            held[patient] = f'P"{chooser.randrange(100)}'
    identifiers = {
        k: {"system": "http://s/" + k[0].lower(), "value": k[1]}
        for k in sorted(targets)
        if chooser.random() < 0.5
    }
    keys = [(r["resourceType"], str(r.get("id"))) for r in resources]
    in_bundle = frozenset(k for k in keys if chooser.random() < 0.6)
    compared = 0
    for resource in resources:
        remote_id = chooser.choice([None, None, f"remote-{chooser.randrange(99)}"])
        options = {
            "remote_id": remote_id,
            "remote_of": held.get,
            "identifier_of": identifiers.get,
            "in_bundle": in_bundle,
        }
        try:
            expected = translated_element_by_element(resource, **options)  # type: ignore[arg-type]
        except UnresolvedPatient as unresolved:
            patient = unresolved.args
            with pytest.raises(UnresolvedPatient) as raised:
                translate_json(resource, **options)  # type: ignore[arg-type]
            assert raised.value.args == patient
            continue
        assert translate_json(resource, **options) == orjson.dumps(expected)  # type: ignore[arg-type]
        assert translate(resource, **options) == expected  # type: ignore[arg-type]
        if remote_id is None:
            # A PUT of our own id names it last, as `{**translated, "id": ...}` did.
            assert translate_json(resource, **options, id_last="ours") == orjson.dumps(  # type: ignore[arg-type]
                {**expected, "id": "ours"}
            )
        compared += 1
    assert compared > len(resources) // 2


def test_translation_asks_for_each_target_once_in_document_order() -> None:
    resource = odd_resources()[1]
    asked: list[Key] = []

    def remote_of(key: Key) -> str | None:
        asked.append(key)
        return "EHR-P" if key[0] == "Patient" else None

    translate_json(resource, remote_id=None, remote_of=remote_of, identifier_of=lambda k: None)
    assert asked == [
        ("Patient", "p1"),
        ("Observation", "\u00e9t\u00e9"),
        ("Condition", 'a"b'),
        ("Observation", "o2"),
        ("Goal", "g1"),
        ("Goal", "g2"),
        ("Goal", "g3"),
        ("Encounter", "e1"),
    ]
    assert resource["subject"]["reference"] == "Patient/p1"  # the input is untouched


def test_referenced_keys_are_those_the_walk_finds() -> None:
    for resource in RESOURCES + odd_resources():
        walked = {k for ref in walk(resource) if (k := relative_key(ref["reference"])) is not None}
        assert referenced_keys(resource) == walked


def test_full_urls_and_identifier_queries_are_as_before() -> None:
    for name in ["o1", "\u00e9t\u00e9", "a b/c", str(uuid.uuid4())]:
        key = ("Observation", name)
        assert bundle_full_url(key) == f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, '/'.join(key))}"
    for system, value in [
        ("http://infusion-bridge.org/fhir/sid/session", "S-901/vital/1"),
        ("urn:oid:2.16.840.1.113883.3.7777.1", "a b|c&d=\u00e9"),
    ]:
        identifier = {"system": system, "value": value}
        assert identifier_query(identifier) == urlencode({"identifier": f"{system}|{value}"})


@pytest.mark.parametrize("encounter_held", [True, False])
def test_decimals_reach_the_ehr_as_they_were_written(encounter_held: bool) -> None:
    """A stored body's numbers (`1.50`, `0.010`, `1e2`) go to the EHR as their text, whether
    its references are rewritten in the bytes (the Encounter held by the EHR) or element by
    element (it is not: the reference becomes a logical one)."""
    stored = (
        b'{"resourceType":"Observation","id":"o1","status":"final",'
        b'"code":{"text":"x"},"subject":{"reference":"Patient/p1"},'
        b'"encounter":{"reference":"Encounter/e1"},'
        b'"valueQuantity":{"value":1.50,"unit":"mg"},'
        b'"component":[{"code":{"text":"a"},"valueQuantity":{"value":0.010}},'
        b'{"code":{"text":"b"},"valueQuantity":{"value":1e2}}]}'
    )
    resource = load_json(stored)

    def remote_of(key: Key) -> str | None:
        return "P1" if key[0] == "Patient" else ("E1" if encounter_held else None)

    def identifier_of(key: Key) -> dict[str, str] | None:
        return {"system": "urn:test", "value": key[1]}

    sent = translate_json(
        resource, remote_id="R1", remote_of=remote_of, identifier_of=identifier_of
    )
    single = dump_json(
        translate(resource, remote_id="R1", remote_of=remote_of, identifier_of=identifier_of)
    )
    for data in (sent, single):
        assert b'"value":1.50,' in data
        assert b'"value":0.010}' in data
        assert b'"value":1e2}' in data
        assert (b'"reference":"Encounter/E1"' in data) == encounter_held
