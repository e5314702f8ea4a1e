"""Mapping throughput: records mapped to FHIR, validated and serialized, in resources/s.

Printed beside two baselines from the same run over the same resources:
- floor: `orjson.dumps` of the finished resources (serializing alone);
- naive: the R4B models' `model_validate` then `model_dump_json` per resource (what a service
  built on the typed models would do).
The measured path is what every record write does: `resources_for`, the structural R4 validator
(fhirkit-rs), the service's profile validator, and `orjson.dumps`. One core, one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import date

import orjson
from fhir.resources.R4B import get_fhir_model_class

from mappings.bundle import map_records
from mappings.context import Resource
from service.bootstrap import mapping_context, resource_validator
from service.config import Settings
from service.records.demo import generate_clinic

PATIENTS = 40


def _rate(count: int, work: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return count / best


def main() -> None:
    records = generate_clinic(seed=7, patients=PATIENTS, as_of=date(2026, 11, 23))
    context = mapping_context(Settings())
    validate = resource_validator().errors
    resources: list[Resource] = list(map_records(records, context=context))
    count = len(resources)

    def measured() -> None:
        for resource in map_records(records, context=context):
            errors = validate(resource)
            assert not errors, errors
            orjson.dumps(resource)

    def floor() -> None:
        for resource in resources:
            orjson.dumps(resource)

    models = {r["resourceType"]: get_fhir_model_class(r["resourceType"]) for r in resources}

    def naive() -> None:
        for resource in resources:
            models[resource["resourceType"]].model_validate(resource).model_dump_json()

    mapped = _rate(count, measured)
    floor_rate = _rate(count, floor)
    naive_rate = _rate(count, naive, repeat=1)
    print(f"\nmapping: {len(records)} demo records -> {count} resources, one core")
    print(f"{'path':<52} {'resources/s':>12} {'ratio':>8}")
    print(f"{'map + validate (R4 + profiles) + serialize':<52} {mapped:>12,.0f} {1:>8.2f}")
    print(
        f"{'floor: orjson.dumps of the finished resources':<52} {floor_rate:>12,.0f} "
        f"{mapped / floor_rate:>8.3f}"
    )
    print(
        f"{'naive: R4B model_validate + model_dump_json':<52} {naive_rate:>12,.0f} "
        f"{mapped / naive_rate:>8.2f}"
    )
