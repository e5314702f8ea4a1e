// One infusion session: Encounter, MedicationAdministration, AdverseEvent, Provenance.

Profile: IBInfusionEncounter
Parent: Encounter
Id: ib-infusion-encounter
Title: "Infusion Bridge infusion encounter"
Description: "An infusion session as an ambulatory encounter of the patient."
* insert Published
* class = $ActCode#AMB
* subject 1..1
* subject only Reference(Patient)
* period 1..1

Profile: IBInfusionMedicationAdministration
Parent: MedicationAdministration
Id: ib-infusion-medicationadministration
Title: "Infusion Bridge ketamine infusion"
Description: "The ketamine given in one outpatient infusion session: the total dose in mg, the rate in mg/h, the intravenous route and site, for the indication, under the course's standing order, in the session's encounter."
* insert Published
* obeys ib-mad-1
* category 1..1
* category = $MedAdminCategory#outpatient
* medication[x] only CodeableConcept
* medicationCodeableConcept = $RXNORM#6130
* subject only Reference(Patient)
* context 1..1
* context only Reference(Encounter)
* reasonReference 1..*
* reasonReference only Reference(Condition)
* request 1..1
* dosage.route 1..1
* dosage.route = $SCT#47625008
* dosage.site from InfusionSiteCode (required)
* dosage.dose = $UCUM#mg
* dosage.rate[x] only SimpleQuantity
* dosage.rateQuantity = $UCUM#mg/h

Invariant: ib-mad-1
Description: "A completed infusion states its period, with start and end, and the total dose given."
Expression: "status = 'completed' implies (effective.ofType(Period).start.exists() and effective.ofType(Period).end.exists() and dosage.dose.exists())"
Severity: #error

Profile: IBInfusionAdverseEvent
Parent: AdverseEvent
Id: ib-infusion-adverseevent
Title: "Infusion Bridge infusion adverse event"
Description: "A side effect during or after an infusion, with the infusion (the MedicationAdministration) as the suspect entity."
* insert Published
* actuality = #actual (exactly)
* event 1..1
* event from AdverseEventCode (required)
* subject only Reference(Patient)
* seriousness 1..1
* severity 1..1
* suspectEntity 1..*
* suspectEntity.instance only Reference(MedicationAdministration)

Profile: IBProvenance
Parent: Provenance
Id: ib-provenance
Title: "Infusion Bridge provenance"
Description: "Which resource versions one version of a clinic record produced, when, and on whose behalf."
* insert Published
* target 1..*
* recorded 1..1
* activity 1..1
* agent 1..*
