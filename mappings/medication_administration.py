"""An infusion session's ketamine as a FHIR MedicationAdministration: what was given, how, by whom.

Pure: no database, HTTP, settings or clock. One MedicationAdministration per session once the
session is more than a plan: given (completed, stopped), being given (in-progress) or not given
(not-done, for cancelled and missed sessions, so the standing order shows the dose that did not
happen). A scheduled session has none: nothing has been given yet.

Must not: put a dose on an administration that gave none (mad-1 requires a dose or a rate in any
dosage, so a not-done administration has no dosage at all), or restate the mg/kg prescription as
the dose: `dose` is the total mg given; the mg/kg and the weight it was calculated from are in
`dosage.text` and the body-weight Observation in `supportingInformation`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mappings.context import (
    MappingContext,
    Profiles,
    Resource,
    coding,
    concept,
    instant,
    meta,
    quantity,
    reference,
    resource_id,
)
from mappings.encounter import cancellation_reason, encounter_reference
from mappings.vital_signs import body_weight_reference
from service.records.models import (
    InfusionSession,
    InfusionSite,
    Product,
    SessionStatus,
    TreatmentCourse,
)

CATEGORY = "http://terminology.hl7.org/CodeSystem/medication-admin-category"
PERFORM_FUNCTION = "http://terminology.hl7.org/CodeSystem/med-admin-perform-function"

STATUS: dict[SessionStatus, str] = {
    SessionStatus.in_progress: "in-progress",
    SessionStatus.completed: "completed",
    SessionStatus.stopped_early: "stopped",
    SessionStatus.cancelled: "not-done",
    SessionStatus.no_show: "not-done",
}
"""Session status to medication-admin-status; a scheduled session has no administration."""

_GIVEN = (SessionStatus.in_progress, SessionStatus.completed, SessionStatus.stopped_early)

# The nurse runs the infusion: the performer. The supervising clinician checks that the dose and
# the patient's state are right and answers for it, which is R4's "verifier"; "witness" would
# say they watched without taking part.
_PERFORMER = coding(PERFORM_FUNCTION, "performer", "Performer")
_VERIFIER = coding(PERFORM_FUNCTION, "verifier", "Verifier")


def administration_reference(session: InfusionSession) -> dict[str, str]:
    """The reference to the session's MedicationAdministration (adverse events suspect it)."""
    return reference(
        "MedicationAdministration", "session", session.external_id, "MedicationAdministration"
    )


def medication_administration(
    session: InfusionSession, *, course: TreatmentCourse, context: MappingContext
) -> Resource | None:
    """An InfusionSession as the MedicationAdministration of its ketamine dose (None: scheduled)."""
    status = STATUS.get(session.status)
    if status is None:
        return None
    given = session.status in _GIVEN
    resource: dict[str, Any] = {
        "resourceType": "MedicationAdministration",
        "id": resource_id("session", session.external_id, "MedicationAdministration"),
        "meta": meta(Profiles.MEDICATION_ADMINISTRATION),
        "identifier": [
            context.identifier("session", session.external_id, "MedicationAdministration")
        ],
        "status": status,
    }
    reason = _status_reason(session)
    if reason is not None:
        resource["statusReason"] = [reason]
    resource |= {
        "category": concept(coding(CATEGORY, "outpatient", "Outpatient")),
        "medicationCodeableConcept": _medication(session.product, context),
        "subject": reference("Patient", "patient", course.patient),
        "context": encounter_reference(session),
    }
    weight = body_weight_reference(session)
    if weight is not None:
        resource["supportingInformation"] = [weight]
    resource |= _effective(session)
    performers = _performers(session) if given else []
    if performers:
        resource["performer"] = performers
    resource |= {
        "reasonReference": [reference("Condition", "diagnosis", course.diagnosis)],
        "request": reference(
            "MedicationRequest", "course", course.external_id, "MedicationRequest"
        ),
    }
    dosage = _dosage(session, context) if given else None
    notes = _notes(session, context, dosage_missing=given and dosage is None)
    if notes:
        resource["note"] = notes
    if dosage is not None:
        resource["dosage"] = dosage
    return resource


def _status_reason(session: InfusionSession) -> dict[str, Any] | None:
    """Why the dose was stopped or not given, as the clinic wrote it."""
    if session.status is SessionStatus.stopped_early and session.status_reason:
        return concept(text=session.status_reason)
    # The same text as the Encounter's reasonCancelled, so both say cancelled or missed.
    return cancellation_reason(session)


def _medication(product: Product | None, context: MappingContext) -> dict[str, Any]:
    """Ketamine: the product's clinical-drug code and the ingredient code.

    The product code comes first when the site's ConceptMap has the concentration; the
    ingredient is always there, so an EHR can match every ketamine administration on it.
    """
    codings: list[dict[str, str]] = []
    text = "Ketamine hydrochloride injection"
    if product is not None:
        concentration = product.concentration_mg_per_ml
        # Only whole concentrations are in the map; 12.5 mg/mL must not be read as 12.
        if concentration.is_integer():
            codings += context.terminology.mapped("ketamine-product", str(int(concentration)))
        text = f"Ketamine hydrochloride {concentration:g} mg/mL injection"
    codings += context.terminology.mapped("medication", "ketamine")
    return concept(*codings, text=text)


def _effective(session: InfusionSession) -> dict[str, Any]:
    """effective[x] is required: the infusion's period once it started, else the planned time."""
    if session.started_at is None:
        return {"effectiveDateTime": instant(session.scheduled_start)}
    period = {"start": instant(session.started_at)}
    if session.ended_at is not None:
        period["end"] = instant(session.ended_at)
    return {"effectivePeriod": period}


def _performers(session: InfusionSession) -> list[dict[str, Any]]:
    staff = ((session.administered_by, _PERFORMER), (session.supervised_by, _VERIFIER))
    return [
        {"function": concept(function), "actor": reference("Practitioner", "clinician", who)}
        for who, function in staff
        if who is not None
    ]


def _notes(
    session: InfusionSession, context: MappingContext, *, dosage_missing: bool
) -> list[dict[str, str]]:
    """What has no element of its own: the product's lot and expiry, and how the dose was given.

    The second only when neither dose nor rate is known yet: a dosage without either would
    break mad-1, but the route and site must not be lost.
    """
    notes: list[dict[str, str]] = []
    if session.product is not None:
        notes.append({"text": _product_note(session.product)})
    if dosage_missing:
        text = dosage_text(session)
        if session.site is not None:
            text += (
                f"; site: {context.terminology.own('infusion-site', session.site.value)['display']}"
            )
        notes.append({"text": text})
    return notes


def _product_note(product: Product) -> str:
    """The product's lot and expiry: R4 MedicationAdministration has no element for them."""
    parts = [f"Product: ketamine {product.concentration_mg_per_ml:g} mg/mL"]
    if product.lot is not None:
        parts.append(f"lot {product.lot}")
    if product.expires is not None:
        parts.append(f"expires {product.expires.isoformat()}")
    return ", ".join(parts)


def _dosage(session: InfusionSession, context: MappingContext) -> dict[str, Any] | None:
    """How the dose was given; None when neither the dose nor the rate is known yet (mad-1)."""
    if session.total_dose_mg is None and session.rate_mg_per_hour is None:
        return None
    dosage: dict[str, Any] = {"text": dosage_text(session)}
    if session.site is not None:
        dosage["site"] = _site(session.site, context)
    dosage["route"] = concept(
        *context.terminology.mapped("route", session.route), text="Intravenous"
    )
    # No SNOMED CT method code for "infuse" was confirmed (TERMINOLOGY.md): text only.
    dosage["method"] = concept(text="Intravenous infusion")
    if session.total_dose_mg is not None:
        dosage["dose"] = quantity(session.total_dose_mg, "mg")
    if session.rate_mg_per_hour is not None:
        dosage["rateQuantity"] = quantity(session.rate_mg_per_hour, "mg/h")
    return dosage


def _site(site: InfusionSite, context: MappingContext) -> dict[str, Any]:
    """The IV site: the SNOMED CT body structure where mapped, and the service's own code.

    The mapped SNOMED CT codes have no side; the laterality is in the own code and the text.
    """
    own = context.terminology.own("infusion-site", site.value)
    codings = (*context.terminology.mapped("infusion-site", site.value), own)
    return concept(*codings, text=own["display"])


def dosage_text(session: InfusionSession) -> str:
    """The dose as a clinician writes it, e.g. "34 mg IV over 42 min (0.5 mg/kg x 68 kg)".

    For a session stopped early the mg/kg times the weight is what was planned, not what was
    given, and the text says so.
    """
    total, per_kg, weight = session.total_dose_mg, session.dose_mg_per_kg, session.weight_kg
    text = f"{total:g} mg IV" if total is not None else "Ketamine IV"
    minutes = _minutes(session.started_at, session.ended_at)
    if minutes is not None:
        text += f" over {minutes} min"
    if per_kg is not None and weight is not None:
        basis = f"{per_kg:g} mg/kg x {weight:g} kg"
        if session.status is SessionStatus.stopped_early:
            basis = f"of {per_kg * weight:.1f} mg planned: {basis}"
        text += f" ({basis})"
    elif per_kg is not None:
        text += f" ({per_kg:g} mg/kg)"
    if session.rate_mg_per_hour is not None:
        text += f" at {session.rate_mg_per_hour:g} mg/h"
    if session.status is SessionStatus.stopped_early:
        text += "; stopped early"
    return text


def _minutes(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() / 60)
