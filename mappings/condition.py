"""Diagnosis records as FHIR Conditions (the indication a course treats), and back.

Pure: no database, HTTP or settings. SNOMED CT codes come from the terminology's ConceptMap; the
ICD-10-CM code is the one the clinic recorded. Treatment resistance has no code in either system,
so it travels in the service's `treatment-resistant` extension and in the text.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from pydantic import ValidationError

from mappings.context import (
    ICD10CM,
    SNOMED,
    MappingContext,
    Profiles,
    Resource,
    coding,
    meta,
    reference,
    resource_id,
)
from mappings.fhir import Condition as ConditionModel
from mappings.unsupported import UnsupportedContent
from service.records.models import Condition, Diagnosis, DiagnosisStatus

CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"


def condition(record: Diagnosis, *, context: MappingContext) -> Resource:
    """A Diagnosis as the Condition its course's CarePlan and infusions address."""
    name = context.terminology.own("condition", record.condition.value)["display"]
    codings = [*context.terminology.mapped("condition", record.condition.value)]
    if record.icd10 is not None:
        codings.append({"system": ICD10CM, "code": record.icd10})
    text = f"{name}, treatment-resistant" if record.treatment_resistant else name
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": resource_id("diagnosis", record.external_id),
        "meta": meta(Profiles.CONDITION),
        "extension": [
            {"url": Profiles.TREATMENT_RESISTANT, "valueBoolean": record.treatment_resistant}
        ],
        "identifier": [context.identifier("diagnosis", record.external_id)],
        "clinicalStatus": {"coding": [coding(CLINICAL_STATUS, record.status.value)]},
        "verificationStatus": {"coding": [coding(VERIFICATION_STATUS, "confirmed")]},
        "category": [{"coding": [coding(CATEGORY, "problem-list-item", "Problem List Item")]}],
        "code": {"coding": codings, "text": text},
        "subject": reference("Patient", "patient", record.patient),
        "recordedDate": record.recorded_on.isoformat(),
    }
    return resource


def diagnosis_from_fhir(
    resource: dict[str, Any],
    *,
    current: Diagnosis | None,
    patient: str | None = None,
    context: MappingContext,
) -> Diagnosis:
    """A FHIR Condition from an EHR as the clinic's diagnosis record.

    The condition must carry one of the indications' SNOMED CT codes; the external id comes
    from the service's identifier or `current`, the patient from `current` or, for a new
    diagnosis, from `patient` (the external id the caller resolved `Condition.subject` to).
    """
    try:
        model = ConditionModel.model_validate(resource)
    except ValidationError as error:
        message = error.errors()[0]["msg"]
        raise UnsupportedContent("Condition", f"not a valid Condition: {message}") from None
    external_id = current.external_id if current else None
    for identifier in model.identifier or []:
        if identifier.system == context.system("diagnosis") and identifier.value:
            external_id = identifier.value
    if external_id is None:
        raise UnsupportedContent(
            "Condition.identifier", f"no identifier in {context.system('diagnosis')}"
        )
    patient = current.patient if current else patient
    if patient is None:
        raise UnsupportedContent("Condition.subject", "the subject is not a patient of the clinic")
    found: Condition | None = None
    icd10: str | None = None
    for item in (model.code.coding if model.code else None) or []:
        if item.system == SNOMED and item.code:
            mapped = context.terminology.unmap("condition", SNOMED, str(item.code))
            found = Condition(mapped) if mapped else found
        if item.system == ICD10CM and item.code:
            icd10 = str(item.code)
    if found is None and current is not None:
        found = current.condition
    if found is None:
        raise UnsupportedContent(
            "Condition.code", "no SNOMED CT code of an indication the clinic treats"
        )
    status = DiagnosisStatus.active
    for item in (model.clinicalStatus.coding if model.clinicalStatus else None) or []:
        if item.system == CLINICAL_STATUS and str(item.code) in DiagnosisStatus.__members__:
            status = DiagnosisStatus(str(item.code))
    treatment_resistant = any(
        extension.url == Profiles.TREATMENT_RESISTANT and extension.valueBoolean
        for extension in model.extension or []
    )
    recorded = model.recordedDate or (current.recorded_on if current else None)
    if recorded is None:
        raise UnsupportedContent("Condition.recordedDate", "the recorded date is required")
    try:
        return Diagnosis(
            external_id=external_id,
            patient=patient,
            condition=found,
            icd10=icd10,
            treatment_resistant=treatment_resistant,
            recorded_on=recorded
            if isinstance(recorded, date)
            else date.fromisoformat(str(recorded)[:10]),
            status=status,
        )
    except ValidationError as error:
        first = error.errors()[0]
        raise UnsupportedContent("Condition.code", str(first["msg"])) from None
