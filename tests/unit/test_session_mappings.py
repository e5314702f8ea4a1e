"""Session mappings: Encounter, MedicationAdministration, vital-sign Observations, AdverseEvents.

Pure tests: records are built from dicts with `parse_record`, mapped, and checked three ways:
golden files (reviewed copies of whole resources), the R4 validators of `tests.fhir_check`, and
the checks below for what those validators leave out (required code bindings, reference targets,
the mad-1 and vital-signs invariants via FHIRPath, the core vital-signs profiles' fixed codes and
units). The code sets and target types below are copied from the official R4 4.0.1 definitions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any

import fhirpathpy
import pytest
from fhirpathpy.models import models

from mappings.adverse_event import adverse_events
from mappings.context import UCUM, MappingContext, Profiles, resource_id
from mappings.encounter import encounter
from mappings.medication_administration import medication_administration
from mappings.terminology import load_terminology
from mappings.vital_signs import vital_signs
from service.records.demo import generate_clinic
from service.records.models import InfusionSession, TreatmentCourse
from service.records.service import parse_record
from tests.factory import clinic
from tests.fhir_check import assert_valid_r4
from tests.golden import assert_golden

CONTEXT = MappingContext()
Resource = dict[str, Any]

# Fixed external ids, so golden files keep their resource ids.
PATIENT, PRESCRIBER, NURSE, DIAGNOSIS, COURSE, SESSION = (
    "P-1001",
    "C-2001",
    "C-2002",
    "D-3001",
    "TC-4001",
    "S-5001",
)

# -- building records --------------------------------------------------------------------------


def _course() -> TreatmentCourse:
    record = clinic().course | {
        "external_id": COURSE,
        "patient": PATIENT,
        "diagnosis": DIAGNOSIS,
        "prescriber": PRESCRIBER,
    }
    course = parse_record(record)
    assert isinstance(course, TreatmentCourse)
    return course


def _session(data: dict[str, Any]) -> InfusionSession:
    session = parse_record(data)
    assert isinstance(session, InfusionSession)
    return session


def _base() -> dict[str, Any]:
    """The factory's completed session, with fixed ids."""
    return clinic().session | {
        "external_id": SESSION,
        "course": COURSE,
        "administered_by": NURSE,
        "supervised_by": PRESCRIBER,
    }


NOT_GIVEN = ("started_at", "ended_at", "total_dose_mg", "rate_mg_per_hour")


def completed() -> dict[str, Any]:
    """A completed infusion with readings before, during and after, and two side effects."""
    data = _base()
    data["vitals"] = [
        *data["vitals"],
        {
            "taken_at": "2026-10-05T10:00:00-04:00",
            "phase": "post",
            "systolic": 126,
            "diastolic": 80,
            "heart_rate": 74,
            "resp_rate": 15,
            "spo2": 97,
            "temperature_c": 36.8,
        },
    ]
    data["adverse_events"] = [
        *data["adverse_events"],
        {
            "kind": "nausea",
            "description": "Queasy on sitting up. Ondansetron 4 mg IV given.",
            "onset_at": "2026-10-05T09:40:00-04:00",
            "severity": "moderate",
            "serious": False,
            "action": "medication_given",
            "resolved_at": "2026-10-05T09:58:00-04:00",
        },
    ]
    return data


def stopped_early() -> dict[str, Any]:
    data = _base() | {
        "status": "stopped_early",
        "ended_at": "2026-10-05T09:30:00-04:00",
        "total_dose_mg": 22.1,
        "status_reason": "Stopped at minute 26 at the patient's request: distressing dissociation.",
    }
    data["vitals"] = [
        data["vitals"][0],
        {"taken_at": "2026-10-05T09:20:00-04:00", "phase": "during", "heart_rate": 84},
        {
            "taken_at": "2026-10-05T09:50:00-04:00",
            "phase": "post",
            "systolic": 130,
            "diastolic": 82,
        },
    ]
    data["adverse_events"] = [
        {
            "kind": "dissociation",
            "description": "Felt detached from body; distressing perceptual changes.",
            "onset_at": "2026-10-05T09:18:00-04:00",
            "severity": "moderate",
            "serious": False,
            "action": "stopped",
            "resolved_at": "2026-10-05T09:44:00-04:00",
        }
    ]
    return data


def in_progress() -> dict[str, Any]:
    """Mid-infusion: no end and no total dose yet; a blood pressure rise not yet resolved."""
    data = _base() | {"status": "in_progress"}
    for field in ("ended_at", "total_dose_mg"):
        del data[field]
    data["vitals"] = [
        data["vitals"][0],
        {
            "taken_at": "2026-10-05T09:30:00-04:00",
            "phase": "during",
            "systolic": 168,
            "diastolic": 96,
            "heart_rate": 88,
        },
    ]
    data["adverse_events"] = [
        {
            "kind": "hypertension",
            "description": "Systolic 168 mmHg at minute 26. Infusion rate reduced.",
            "onset_at": "2026-10-05T09:30:00-04:00",
            "severity": "moderate",
            "serious": False,
            "action": "rate_reduced",
        }
    ]
    return data


def cancelled() -> dict[str, Any]:
    """Cancelled in the chair: the pre-infusion blood pressure was too high to start."""
    data = _base() | {
        "status": "cancelled",
        "status_reason": "Blood pressure 182/104 before the infusion; rescheduled.",
    }
    for field in (*NOT_GIVEN, "dose_mg_per_kg", "product", "site"):
        del data[field]
    data["vitals"] = [
        {
            "taken_at": "2026-10-05T08:58:00-04:00",
            "phase": "pre",
            "systolic": 182,
            "diastolic": 104,
            "heart_rate": 90,
        }
    ]
    data["assessments"] = []
    data["adverse_events"] = []
    return data


def _not_started(status: str) -> dict[str, Any]:
    data = {
        key: value
        for key, value in _base().items()
        if key in ("kind", "external_id", "course", "scheduled_start", "route")
    }
    return data | {"status": status}


def no_show() -> dict[str, Any]:
    return _not_started("no_show")


def scheduled() -> dict[str, Any]:
    return _not_started("scheduled") | {"weight_kg": 68.0, "dose_mg_per_kg": 0.5}


def map_session(
    session: InfusionSession, course: TreatmentCourse, context: MappingContext = CONTEXT
) -> list[Resource]:
    """All four mappings, in the order `mappings.records` writes them."""
    out = [encounter(session, course=course, context=context)]
    out += vital_signs(session, course=course, context=context)
    administration = medication_administration(session, course=course, context=context)
    if administration is not None:
        out.append(administration)
    out += adverse_events(session, course=course, context=context)
    return out


# -- checks the validators leave out ------------------------------------------------------------

HL7 = "http://terminology.hl7.org/CodeSystem/"
CODE_SYSTEMS: dict[str, set[str]] = {
    HL7 + "v3-ActCode": {"AMB"},
    HL7 + "v3-ParticipationType": {"ADM", "ATND", "CALLBCK", "CON", "DIS", "ESC", "REF"}
    | {"SPRF", "PPRF", "PART"},
    HL7 + "med-admin-perform-function": {"performer", "verifier", "witness"},
    HL7 + "medication-admin-category": {"inpatient", "outpatient", "community"},
    HL7 + "observation-category": {
        "social-history",
        "vital-signs",
        "imaging",
        "laboratory",
        "procedure",
        "survey",
        "exam",
        "therapy",
        "activity",
    },
    HL7 + "adverse-event-seriousness": {"Serious", "Non-serious"},
    HL7 + "adverse-event-severity": {"mild", "moderate", "severe"},
    HL7 + "adverse-event-outcome": {
        "resolved",
        "recovering",
        "ongoing",
        "resolvedWithSequelae",
        "fatal",
        "unknown",
    },
}
"""The codes of the HL7 CodeSystems the session mappings use (the ActCode list is only AMB)."""

STATUS_CODES: dict[str, set[str]] = {
    "Encounter": {"planned", "arrived", "triaged", "in-progress", "onleave", "finished"}
    | {"cancelled", "entered-in-error", "unknown"},
    "MedicationAdministration": {"in-progress", "not-done", "on-hold", "completed"}
    | {"entered-in-error", "stopped", "unknown"},
    "Observation": {"registered", "preliminary", "final", "amended", "corrected", "cancelled"}
    | {"entered-in-error", "unknown"},
}
"""Required bindings of `status`."""

TARGETS: dict[str, set[str] | None] = {
    "Encounter.subject": {"Patient", "Group"},
    "Encounter.participant.individual": {"Practitioner", "PractitionerRole", "RelatedPerson"},
    "Encounter.reasonReference": {
        "Condition",
        "Procedure",
        "Observation",
        "ImmunizationRecommendation",
    },
    "Encounter.serviceProvider": {"Organization"},
    "MedicationAdministration.subject": {"Patient", "Group"},
    "MedicationAdministration.context": {"Encounter", "EpisodeOfCare"},
    "MedicationAdministration.supportingInformation": None,
    "MedicationAdministration.performer.actor": {
        "Practitioner",
        "PractitionerRole",
        "Patient",
        "RelatedPerson",
        "Device",
    },
    "MedicationAdministration.reasonReference": {"Condition", "Observation", "DiagnosticReport"},
    "MedicationAdministration.request": {"MedicationRequest"},
    # The vitalsigns profile narrows subject to Patient.
    "Observation.subject": {"Patient"},
    "Observation.encounter": {"Encounter"},
    "AdverseEvent.subject": {"Patient", "Group", "Practitioner", "RelatedPerson"},
    "AdverseEvent.encounter": {"Encounter"},
    "AdverseEvent.suspectEntity.instance": {
        "Immunization",
        "Procedure",
        "Substance",
        "Medication",
        "MedicationAdministration",
        "MedicationStatement",
        "Device",
    },
}
"""Allowed target types of every reference element the mappings fill (None: any resource)."""

INVARIANTS: dict[str, list[tuple[str, str]]] = {
    "MedicationAdministration": [
        ("mad-1", "MedicationAdministration.dosage.all(dose.exists() or rate.exists())"),
    ],
    "Observation": [
        ("vs-1", "Observation.effective.all(($this as dateTime).toString().length() >= 8)"),
        (
            "vs-2",
            "(component.empty() and hasMember.empty())"
            " implies (dataAbsentReason.exists() or value.exists())",
        ),
        ("vs-3", "Observation.component.all(value.exists() or dataAbsentReason.exists())"),
    ],
}
"""Invariants neither validator evaluates, as FHIRPath over the whole resource."""

_COMPILED = {
    kind: [(key, fhirpathpy.compile(expression, models["r4"])) for key, expression in rules]
    for kind, rules in INVARIANTS.items()
}
"""Compiled once: parsing FHIRPath per resource would dominate the demo test's run time."""

VITAL_PROFILES: dict[str, tuple[str, str | None]] = {
    Profiles.BLOOD_PRESSURE: ("85354-9", None),
    Profiles.HEART_RATE: ("8867-4", "/min"),
    Profiles.RESPIRATORY_RATE: ("9279-1", "/min"),
    Profiles.OXYGEN_SATURATION: ("2708-6", "%"),
    Profiles.BODY_TEMPERATURE: ("8310-5", "Cel"),
    Profiles.BODY_WEIGHT: ("29463-7", "kg"),
}
"""The LOINC code each core profile fixes, and the UCUM code of its value (bp: components)."""


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every (element path, value) below `node`, array indices left out of the path."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            if key != "extension":
                yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, path)


def _loinc(concept: dict[str, Any], code: str) -> int:
    return sum(
        1
        for coding in concept.get("coding", [])
        if coding.get("system") == "http://loinc.org" and coding.get("code") == code
    )


def _ucum_problems(quantity: Any, ucum: str, where: str) -> list[str]:
    ok = (
        isinstance(quantity, dict)
        and "value" in quantity
        and quantity.get("unit")
        and quantity.get("system") == UCUM
        and quantity.get("code") == ucum
    )
    return [] if ok else [f"{where}: not a {ucum} UCUM quantity with value and unit"]


def _vital_sign_problems(resource: Resource) -> list[str]:
    """The vitalsigns profile and the specific core profile the Observation claims."""
    problems: list[str] = []
    profiles = resource.get("meta", {}).get("profile", [])
    claimed = [p for p in profiles if p in VITAL_PROFILES]
    if len(claimed) != 1:
        return [f"claims {profiles}, not one core vital-signs profile"]
    code, ucum = VITAL_PROFILES[claimed[0]]
    categories = [
        c
        for category in resource.get("category", [])
        for c in category.get("coding", [])
        if c.get("system") == HL7 + "observation-category" and c.get("code") == "vital-signs"
    ]
    if len(categories) != 1:
        problems.append("category: needs exactly one vital-signs coding")
    if _loinc(resource.get("code", {}), code) != 1:
        problems.append(f"code: needs exactly one LOINC {code} coding")
    if "effectiveDateTime" not in resource and "effectivePeriod" not in resource:
        problems.append("effective[x]: required by the vitalsigns profile")
    if ucum is not None:
        problems += _ucum_problems(resource.get("valueQuantity"), ucum, "valueQuantity")
        return problems
    # bp: no value of its own; one systolic and one diastolic component in mm[Hg].
    if "valueQuantity" in resource:
        problems.append("valueQuantity: 0..0 in the bp profile")
    components = resource.get("component", [])
    for part in ("8480-6", "8462-4"):
        matching = [c for c in components if _loinc(c.get("code", {}), part) == 1]
        if len(matching) != 1:
            problems.append(f"component: needs exactly one {part}")
        for component in matching:
            problems += _ucum_problems(component.get("valueQuantity"), "mm[Hg]", part)
    return problems


def problems(resource: Resource) -> list[str]:
    """What an R4 4.0.1 validator with the core profiles would report and fhirkit does not."""
    kind = resource["resourceType"]
    found: list[str] = []
    if kind in STATUS_CODES and resource.get("status") not in STATUS_CODES[kind]:
        found.append(f"status: {resource.get('status')!r} is not in the required value set")
    if kind == "AdverseEvent" and resource.get("actuality") not in ("actual", "potential"):
        found.append("actuality: not in the required value set")
    for path, node in _walk(resource, kind):
        system, code = node.get("system"), node.get("code")
        if system in CODE_SYSTEMS and code not in CODE_SYSTEMS[system]:
            found.append(f"{path}: {code!r} is not a code of {system}")
        if isinstance(node.get("reference"), str):
            if path not in TARGETS:
                found.append(f"{path}: a reference element this check does not know")
                continue
            allowed = TARGETS[path]
            target = node["reference"].split("/")[0]
            if allowed is not None and target not in allowed:
                found.append(f"{path}: {target} is not an allowed target ({sorted(allowed)})")
    for key, evaluate in _COMPILED.get(kind, []):
        if evaluate(resource, {}) != [True]:
            found.append(f"{key} fails")
    if kind == "Observation":
        found += _vital_sign_problems(resource)
    return found


def assert_valid(resource: Resource) -> None:
    assert_valid_r4(resource)
    assert problems(resource) == [], f"{resource['resourceType']}/{resource['id']}"


def external_targets(session: InfusionSession, course: TreatmentCourse) -> set[str]:
    """The resources of other records a session's resources may reference."""
    refs = {
        f"Patient/{resource_id('patient', course.patient)}",
        f"Condition/{resource_id('diagnosis', course.diagnosis)}",
        f"Organization/{resource_id('organization', CONTEXT.organization_id)}",
        f"MedicationRequest/{resource_id('course', course.external_id, 'MedicationRequest')}",
    }
    for clinician in (session.administered_by, session.supervised_by):
        if clinician is not None:
            refs.add(f"Practitioner/{resource_id('clinician', clinician)}")
    return refs


def references(resource: Resource) -> list[str]:
    return [
        node["reference"]
        for _, node in _walk(resource, resource["resourceType"])
        if isinstance(node.get("reference"), str)
    ]


def by_type(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["resourceType"] == kind]


def only(resources: list[Resource], kind: str) -> Resource:
    (found,) = by_type(resources, kind)
    return found


# -- the checks themselves have teeth -------------------------------------------------------------


def _bp_without_components(resources: list[Resource]) -> Resource:
    bp = next(r for r in resources if Profiles.BLOOD_PRESSURE in r["meta"]["profile"])
    return {k: v for k, v in bp.items() if k != "component"}


def _dosage_without_dose(resources: list[Resource]) -> Resource:
    administration = copy.deepcopy(only(resources, "MedicationAdministration"))
    del administration["dosage"]["dose"], administration["dosage"]["rateQuantity"]
    return administration


def _lowercase_seriousness(resources: list[Resource]) -> Resource:
    event = copy.deepcopy(by_type(resources, "AdverseEvent")[0])
    event["seriousness"]["coding"][0]["code"] = "non-serious"
    return event


def _subject_is_encounter(resources: list[Resource]) -> Resource:
    administration = only(resources, "MedicationAdministration")
    return administration | {"subject": administration["context"]}


def _heart_rate_in_bpm(resources: list[Resource]) -> Resource:
    heart_rate = copy.deepcopy(
        next(r for r in resources if Profiles.HEART_RATE in r["meta"]["profile"])
    )
    heart_rate["valueQuantity"]["code"] = "{beats}/min"
    return heart_rate


def _spo2_without_2708(resources: list[Resource]) -> Resource:
    spo2 = copy.deepcopy(
        next(r for r in resources if Profiles.OXYGEN_SATURATION in r["meta"]["profile"])
    )
    spo2["code"]["coding"] = spo2["code"]["coding"][1:]
    return spo2


def _date_only_to_the_year(resources: list[Resource]) -> Resource:
    return by_type(resources, "Observation")[0] | {"effectiveDateTime": "2026"}


@pytest.mark.parametrize(
    "breaks",
    [
        _bp_without_components,
        _dosage_without_dose,
        _lowercase_seriousness,
        _subject_is_encounter,
        _heart_rate_in_bpm,
        _spo2_without_2708,
        _date_only_to_the_year,
    ],
)
def test_the_checks_catch_broken_resources(breaks: Callable[[list[Resource]], Resource]) -> None:
    resources = map_session(_session(completed()), _course())
    broken = breaks(resources)
    assert problems(broken) != []


# -- golden files ---------------------------------------------------------------------------------


def test_completed_session_golden() -> None:
    session, course = _session(completed()), _course()
    administration = medication_administration(session, course=course, context=CONTEXT)
    resources = {
        "session-completed-encounter": encounter(session, course=course, context=CONTEXT),
        "session-completed-medication-administration": administration,
        "session-completed-vital-signs": vital_signs(session, course=course, context=CONTEXT),
        "session-completed-adverse-events": adverse_events(session, course=course, context=CONTEXT),
    }
    for name, mapped in resources.items():
        for resource in mapped if isinstance(mapped, list) else [mapped]:
            assert resource is not None
            assert_valid(resource)
        assert_golden(name, mapped)


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("stopped-early", stopped_early),
        ("in-progress", in_progress),
        ("cancelled", cancelled),
        ("no-show", no_show),
        ("scheduled", scheduled),
    ],
)
def test_status_variant_golden(name: str, build: Callable[[], dict[str, Any]]) -> None:
    resources = map_session(_session(build()), _course())
    for resource in resources:
        assert_valid(resource)
    assert_golden(f"session-{name}", resources)


# -- status variants -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "encounter_status", "administration_status", "effective"),
    [
        (completed, "finished", "completed", "effectivePeriod"),
        (stopped_early, "finished", "stopped", "effectivePeriod"),
        (in_progress, "in-progress", "in-progress", "effectivePeriod"),
        (cancelled, "cancelled", "not-done", "effectiveDateTime"),
        (no_show, "cancelled", "not-done", "effectiveDateTime"),
        (scheduled, "planned", None, None),
    ],
)
def test_statuses(
    build: Callable[[], dict[str, Any]],
    encounter_status: str,
    administration_status: str | None,
    effective: str | None,
) -> None:
    session, course = _session(build()), _course()
    assert encounter(session, course=course, context=CONTEXT)["status"] == encounter_status
    administration = medication_administration(session, course=course, context=CONTEXT)
    if administration_status is None:
        assert administration is None
        return
    assert administration is not None
    assert administration["status"] == administration_status
    assert effective in administration
    if administration_status == "not-done":
        # Nothing given: no dose (mad-1 allows no dosage without one) and nobody performed it.
        assert "dosage" not in administration
        assert "performer" not in administration
        assert administration["effectiveDateTime"] == session.scheduled_start.isoformat()


def test_scheduled_encounter_is_planned_at_the_scheduled_start() -> None:
    session, course = _session(scheduled()), _course()
    resource = encounter(session, course=course, context=CONTEXT)
    assert resource["period"] == {"start": "2026-10-05T09:00:00-04:00"}
    assert "participant" not in resource
    # The weight for the planned dose is a planning figure, not a measurement at a visit that
    # has not happened: no Observation dated in the future.
    assert vital_signs(session, course=course, context=CONTEXT) == []


def test_weight_of_a_session_cancelled_in_the_chair_is_dated_at_the_first_reading() -> None:
    session, course = _session(cancelled()), _course()
    weight, *_ = vital_signs(session, course=course, context=CONTEXT)
    assert weight["meta"]["profile"] == [Profiles.BODY_WEIGHT]
    assert weight["effectiveDateTime"] == "2026-10-05T08:58:00-04:00"
    administration = medication_administration(session, course=course, context=CONTEXT)
    assert administration is not None
    assert administration["supportingInformation"] == [{"reference": f"Observation/{weight['id']}"}]


def test_cancelled_and_missed_sessions_say_which_they_were() -> None:
    course = _course()
    for build, text in (
        (cancelled, "Cancelled: Blood pressure 182/104 before the infusion; rescheduled."),
        (no_show, "Did not attend"),
    ):
        session = _session(build())
        visit = encounter(session, course=course, context=CONTEXT)
        assert visit["extension"] == [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/encounter-reasonCancelled",
                "valueCodeableConcept": {"text": text},
            }
        ]
        administration = medication_administration(session, course=course, context=CONTEXT)
        assert administration is not None
        assert administration["statusReason"] == [{"text": text}]


def test_stopped_early_keeps_the_reason_and_the_partial_dose() -> None:
    session, course = _session(stopped_early()), _course()
    administration = medication_administration(session, course=course, context=CONTEXT)
    assert administration is not None
    assert administration["statusReason"] == [{"text": session.status_reason}]
    assert administration["dosage"]["dose"]["value"] == 22.1
    # 0.5 mg/kg x 68 kg is what was planned, not what was given.
    assert administration["dosage"]["text"] == (
        "22.1 mg IV over 26 min (of 34.0 mg planned: 0.5 mg/kg x 68 kg) at 51 mg/h; stopped early"
    )


def test_in_progress_dosage_has_the_rate_but_no_dose_yet() -> None:
    session, course = _session(in_progress()), _course()
    administration = medication_administration(session, course=course, context=CONTEXT)
    assert administration is not None
    assert administration["effectivePeriod"] == {"start": "2026-10-05T09:04:00-04:00"}
    assert "dose" not in administration["dosage"]
    assert administration["dosage"]["rateQuantity"]["code"] == "mg/h"


def test_dosage_details_survive_without_dose_or_rate() -> None:
    data = in_progress()
    del data["rate_mg_per_hour"]
    session, course = _session(data), _course()
    administration = medication_administration(session, course=course, context=CONTEXT)
    assert administration is not None
    assert_valid(administration)
    assert "dosage" not in administration
    assert administration["note"][-1] == {
        "text": "Ketamine IV (0.5 mg/kg x 68 kg); site: Left forearm"
    }


# -- content a clinician needs ------------------------------------------------------------------


def test_completed_administration_carries_dose_rate_product_and_staff() -> None:
    session, course = _session(completed()), _course()
    administration = medication_administration(session, course=course, context=CONTEXT)
    assert administration is not None
    dosage = administration["dosage"]
    assert dosage["dose"] == {"value": 34.0, "unit": "mg", "system": UCUM, "code": "mg"}
    assert dosage["rateQuantity"] == {"value": 51.0, "unit": "mg/h", "system": UCUM, "code": "mg/h"}
    assert dosage["text"] == "34 mg IV over 42 min (0.5 mg/kg x 68 kg) at 51 mg/h"
    assert dosage["site"]["text"] == "Left forearm"
    codes = {
        (c["system"], c["code"]) for c in administration["medicationCodeableConcept"]["coding"]
    }
    assert ("http://www.nlm.nih.gov/research/umls/rxnorm", "6130") in codes
    assert administration["note"] == [
        {"text": "Product: ketamine 50 mg/mL, lot K12345, expires 2027-06-30"}
    ]
    functions = {
        p["function"]["coding"][0]["code"]: p["actor"]["reference"]
        for p in administration["performer"]
    }
    assert functions == {
        "performer": f"Practitioner/{resource_id('clinician', NURSE)}",
        "verifier": f"Practitioner/{resource_id('clinician', PRESCRIBER)}",
    }
    weight = f"Observation/{resource_id('session', SESSION, 'weight')}"
    assert administration["supportingInformation"] == [{"reference": weight}]


def test_product_codes_come_from_the_site_terminology() -> None:
    override = {
        "resourceType": "ConceptMap",
        "id": "ketamine-product",
        "group": [
            {
                "source": "http://infusion-bridge.org/fhir/CodeSystem/ketamine-product",
                "target": "http://example.org/formulary",
                "element": [
                    {"code": "50", "target": [{"code": "KET-50", "equivalence": "equivalent"}]}
                ],
            }
        ],
    }
    context = MappingContext(terminology=load_terminology([override]))
    session, course = _session(completed()), _course()
    administration = medication_administration(session, course=course, context=context)
    assert administration is not None
    systems = [c["system"] for c in administration["medicationCodeableConcept"]["coding"]]
    assert "http://example.org/formulary" in systems


def test_a_concentration_the_map_lacks_keeps_only_the_ingredient() -> None:
    data = completed()
    data["product"] = {"concentration_mg_per_ml": 12.5}
    session, course = _session(data), _course()
    administration = medication_administration(session, course=course, context=CONTEXT)
    assert administration is not None
    medication = administration["medicationCodeableConcept"]
    assert [c["code"] for c in medication["coding"]] == ["6130"]
    assert medication["text"] == "Ketamine hydrochloride 12.5 mg/mL injection"


def test_each_measurement_is_one_observation_with_its_phase() -> None:
    session, course = _session(completed()), _course()
    observations = vital_signs(session, course=course, context=CONTEXT)
    readings = [o for o in observations if Profiles.BODY_WEIGHT not in o["meta"]["profile"]]
    fields = ("systolic", "heart_rate", "resp_rate", "spo2", "temperature_c")
    expected = sum(getattr(v, f) is not None for v in session.vitals for f in fields)
    assert len(readings) == expected
    phases = {v.taken_at.isoformat(): v.phase.value for v in session.vitals}
    notes = {"pre": "Pre-infusion", "during": "During infusion", "post": "Post-infusion"}
    for reading in readings:
        assert reading["note"] == [{"text": notes[phases[reading["effectiveDateTime"]]]}]


def test_oxygen_saturation_carries_both_loinc_codes() -> None:
    session, course = _session(completed()), _course()
    spo2 = [
        o
        for o in vital_signs(session, course=course, context=CONTEXT)
        if Profiles.OXYGEN_SATURATION in o["meta"]["profile"]
    ]
    assert spo2
    for observation in spo2:
        assert [c["code"] for c in observation["code"]["coding"]] == ["2708-6", "59408-5"]


def test_effective_times_keep_the_record_offset() -> None:
    data = completed()
    data["vitals"][0]["taken_at"] = "2026-10-05T15:02:00+02:00"
    session, course = _session(data), _course()
    times = {o["effectiveDateTime"] for o in vital_signs(session, course=course, context=CONTEXT)}
    assert "2026-10-05T15:02:00+02:00" in times


def test_adverse_events_keep_action_resolution_and_description() -> None:
    session, course = _session(completed()), _course()
    dissociation, nausea = adverse_events(session, course=course, context=CONTEXT)
    assert nausea["event"]["text"] == "Queasy on sitting up. Ondansetron 4 mg IV given."
    assert [c["code"] for c in nausea["event"]["coding"]] == ["422587007", "nausea"]
    assert nausea["extension"][0]["valueAnnotation"]["text"] == (
        "Medication given. Resolved at 2026-10-05T09:58:00-04:00 (18 min after onset)."
    )
    assert nausea["outcome"]["coding"][0]["code"] == "resolved"
    assert nausea["severity"]["coding"][0]["code"] == "moderate"
    assert dissociation["event"]["text"] == "Dissociation"
    administration = (
        f"MedicationAdministration/{resource_id('session', SESSION, 'MedicationAdministration')}"
    )
    assert dissociation["suspectEntity"] == [{"instance": {"reference": administration}}]


def test_unresolved_adverse_event_is_ongoing() -> None:
    session, course = _session(in_progress()), _course()
    (event,) = adverse_events(session, course=course, context=CONTEXT)
    assert event["outcome"]["coding"][0]["code"] == "ongoing"
    assert event["seriousness"]["coding"][0]["code"] == "Non-serious"
    assert event["extension"][0]["valueAnnotation"]["text"] == (
        "Infusion rate reduced. Not recorded as resolved."
    )


def test_encounter_period_spans_everything_recorded_in_the_visit() -> None:
    session, course = _session(completed()), _course()
    visit = encounter(session, course=course, context=CONTEXT)
    # The PHQ-9 at 08:50 opens the visit; the post-infusion vitals at 10:00 close it.
    assert visit["period"] == {
        "start": "2026-10-05T08:50:00-04:00",
        "end": "2026-10-05T10:00:00-04:00",
    }


# -- ids ------------------------------------------------------------------------------------------


def test_ids_follow_the_readme_and_are_stable() -> None:
    session, course = _session(completed()), _course()
    first = map_session(session, course)
    assert first == map_session(_session(completed()), _course())
    ids = {r["id"] for r in first}
    assert len(ids) == len(first)
    assert resource_id("session", SESSION, "Encounter") in ids
    assert resource_id("session", SESSION, "MedicationAdministration") in ids
    assert resource_id("session", SESSION, "weight") in ids
    taken = session.vitals[0].taken_at.isoformat()
    for measure in ("bp", "heart-rate", "resp-rate", "spo2"):
        assert resource_id("session", SESSION, "vitals", taken, measure) in ids
    onset = session.adverse_events[0].onset_at.isoformat()
    assert resource_id("session", SESSION, "adverse-event", "dissociation", onset) in ids


def test_another_session_gets_other_ids() -> None:
    course = _course()
    one = {r["id"] for r in map_session(_session(completed()), course)}
    other = {
        r["id"] for r in map_session(_session(completed() | {"external_id": "S-5002"}), course)
    }
    assert one.isdisjoint(other)


# -- the demo clinic ------------------------------------------------------------------------------


def demo() -> list[tuple[InfusionSession, TreatmentCourse]]:
    records = generate_clinic(seed=7, patients=10, as_of=date(2026, 11, 23))
    courses = {r.external_id: r for r in records if isinstance(r, TreatmentCourse)}
    return [(r, courses[r.course]) for r in records if isinstance(r, InfusionSession)]


def test_every_demo_session_resource_is_valid_r4() -> None:
    seen: dict[str, str] = {}
    statuses = set()
    for session, course in demo():
        statuses.add(session.status.value)
        resources = map_session(session, course)
        own = {f"{r['resourceType']}/{r['id']}" for r in resources}
        allowed = own | external_targets(session, course)
        for resource in resources:
            assert_valid(resource)
            # Ids never collide across the clinic; every reference resolves to a known resource.
            key = f"{resource['resourceType']}/{resource['id']}"
            assert key not in seen, f"{key} of {session.external_id} also in {seen.get(key)}"
            seen[key] = session.external_id
            assert set(references(resource)) <= allowed, session.external_id
    assert {"completed", "stopped_early", "cancelled", "no_show", "scheduled"} <= statuses


def test_demo_encounters_contain_their_observations() -> None:
    for session, course in demo():
        resources = map_session(session, course)
        period = only(resources, "Encounter")["period"]
        start = datetime.fromisoformat(period["start"])
        end = datetime.fromisoformat(period["end"]) if "end" in period else None
        for observation in by_type(resources, "Observation"):
            taken = datetime.fromisoformat(observation["effectiveDateTime"])
            assert start <= taken, (session.external_id, observation["id"])
            assert end is None or taken <= end, (session.external_id, observation["id"])


def test_demo_administrations_exist_unless_scheduled() -> None:
    for session, course in demo():
        administration = medication_administration(session, course=course, context=CONTEXT)
        assert (administration is None) == (session.status.value == "scheduled")
