"""Patient records as FHIR Patients, and Patients an EHR sends back as patient records.

Pure: no database, HTTP or settings; the context carries the site's identifier systems.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from pydantic import ValidationError

from mappings.context import MappingContext, Profiles, Resource, coding, meta, resource_id
from mappings.fhir import Patient as PatientModel
from mappings.unsupported import UnsupportedContent
from service.records.models import HumanName, Identifier, Patient, Sex

_MR = coding("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical record number")


def patient(record: Patient, *, context: MappingContext) -> Resource:
    """A clinic Patient record as the FHIR Patient EHRs match and reference."""
    identifiers: list[dict[str, Any]] = [
        context.identifier("patient", record.external_id),
        {"type": {"coding": [_MR]}, "system": context.mrn_system, "value": record.mrn},
    ]
    identifiers += [{"system": i.system, "value": i.value} for i in record.ehr_identifiers]
    return {
        "resourceType": "Patient",
        "id": resource_id("patient", record.external_id),
        "meta": meta(Profiles.PATIENT),
        "identifier": identifiers,
        "active": True,
        "name": [_name(record.name)],
        "gender": record.sex.value,
        "birthDate": record.birth_date.isoformat(),
        "managingOrganization": context.organization_reference,
    }


def _name(name: HumanName) -> dict[str, Any]:
    return {
        "use": "official",
        "text": " ".join([*name.given, name.family]),
        "family": name.family,
        "given": list(name.given),
    }


def patient_from_fhir(
    resource: dict[str, Any], *, current: Patient | None, context: MappingContext
) -> Patient:
    """A FHIR Patient from an EHR as the clinic's patient record (demographics, identifiers).

    The external id and MRN come from the service's own identifiers when the Patient carries
    them, else from `current`; other identifiers become EHR identifiers.
    """
    try:
        model = PatientModel.model_validate(resource)
    except ValidationError as error:
        raise UnsupportedContent(
            "Patient", f"not a valid Patient: {error.errors()[0]['msg']}"
        ) from None
    own_system = context.system("patient")
    external_id = current.external_id if current else None
    mrn = current.mrn if current else None
    ehr: list[Identifier] = []
    for index, identifier in enumerate(model.identifier or []):
        if identifier.system is None or identifier.value is None:
            continue
        if identifier.system == own_system:
            external_id = identifier.value
        elif identifier.system == context.mrn_system:
            mrn = identifier.value
        else:
            try:
                ehr.append(Identifier(system=identifier.system, value=identifier.value))
            except ValidationError:
                raise UnsupportedContent(
                    f"Patient.identifier[{index}].system",
                    f"{identifier.system!r} is not a URI the service can keep",
                ) from None
    if external_id is None:
        raise UnsupportedContent("Patient.identifier", f"no identifier in {own_system}")
    if mrn is None:
        raise UnsupportedContent("Patient.identifier", f"no MRN in {context.mrn_system}")
    names = [n for n in model.name or [] if n.family and n.given]
    official = next((n for n in names if n.use == "official"), names[0] if names else None)
    if official is None:
        raise UnsupportedContent("Patient.name", "no name with both family and given parts")
    if model.birthDate is None:
        raise UnsupportedContent("Patient.birthDate", "the birth date is required")
    return Patient(
        external_id=external_id,
        mrn=mrn,
        ehr_identifiers=ehr,
        name=HumanName(given=[str(g) for g in official.given or []], family=str(official.family)),
        birth_date=date.fromisoformat(str(model.birthDate)),
        sex=Sex(model.gender or "unknown"),
    )
