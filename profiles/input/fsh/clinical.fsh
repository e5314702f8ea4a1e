// The indication and the treatment course: Condition, CarePlan, MedicationRequest, Goal.

Extension: TreatmentResistant
Id: treatment-resistant
Title: "Treatment-resistant"
Description: "Whether the indication has not responded to adequate trials of standard treatment. Treatment resistance has no code in SNOMED CT or ICD-10-CM, so the Condition codes the underlying disorder and carries this flag beside it (and in its text)."
Context: Condition
* insert Published
* value[x] 1..1
* value[x] only boolean

Profile: IBIndicationCondition
Parent: Condition
Id: ib-indication-condition
Title: "Infusion Bridge indication"
Description: "The diagnosis a ketamine treatment course treats: a problem-list Condition coded in SNOMED CT from the indications the clinic treats, with the clinic's ICD-10-CM code when recorded, and the treatment-resistant flag."
* insert Published
* extension contains TreatmentResistant named treatmentResistant 0..1
* clinicalStatus 1..1
* verificationStatus 1..1
* category 1..*
* category ^slicing.discriminator.type = #pattern
* category ^slicing.discriminator.path = "$this"
* category ^slicing.rules = #open
* category ^slicing.description = "The problem-list category; others may follow."
* category contains problemListItem 1..1
* category[problemListItem] = $ConditionCategory#problem-list-item
* code 1..1
* code.coding 1..*
* code.coding ^slicing.discriminator.type = #value
* code.coding ^slicing.discriminator.path = "system"
* code.coding ^slicing.rules = #open
* code.coding ^slicing.description = "SNOMED CT (required) and ICD-10-CM (when the clinic recorded it), by code system."
* code.coding contains snomed 1..1 and icd10cm 0..1
* code.coding[snomed] ^short = "The indication in SNOMED CT"
* code.coding[snomed].system 1..1
* code.coding[snomed].system = $SCT (exactly)
* code.coding[snomed].code 1..1
* code.coding[snomed] from IndicationSnomed (required)
* code.coding[icd10cm] ^short = "The diagnosis the clinic recorded, in ICD-10-CM"
* code.coding[icd10cm].system 1..1
* code.coding[icd10cm].system = $ICD10CM (exactly)
* code.coding[icd10cm].code 1..1
* subject only Reference(Patient)

Profile: IBTreatmentCourseCarePlan
Parent: CarePlan
Id: ib-treatment-course-careplan
Title: "Infusion Bridge treatment course"
Description: "A ketamine treatment course as a plan: one activity per induction week and one for maintenance, each with its Timing, addressing the indication; completed infusions are the activities' outcomes."
* insert Published
* status 1..1
* intent = #plan (exactly)
* subject only Reference(Patient)
* period 1..1
* period.start 1..1
* addresses 1..*
* addresses only Reference(Condition)
* activity 1..*
* activity ^slicing.discriminator.type = #exists
* activity ^slicing.discriminator.path = "reference"
* activity ^slicing.rules = #closed
* activity ^slicing.description = "The standing order (a reference) and the phases (details)."
* activity contains standingOrder 0..1 and phase 1..*
* activity[standingOrder] ^short = "The course's standing order for ketamine"
* activity[standingOrder].reference 1..1
* activity[standingOrder].reference only Reference(MedicationRequest)
* activity[phase] ^short = "An induction week or the maintenance phase, with its Timing"
* activity[phase].reference 0..0
* activity[phase].detail 1..1
* activity[phase].detail.scheduled[x] 1..1
* activity[phase].detail.scheduled[x] only Timing

Profile: IBStandingOrderMedicationRequest
Parent: MedicationRequest
Id: ib-standing-order-medicationrequest
Title: "Infusion Bridge standing order"
Description: "The course's standing order for ketamine: intravenous, dosed in mg per kg of body weight."
* insert Published
* intent = #order (exactly)
* medication[x] 1..1
* medication[x] only CodeableConcept
* medicationCodeableConcept = $RXNORM#6130
* subject only Reference(Patient)
* dosageInstruction 1..*
* dosageInstruction.route 1..1
* dosageInstruction.route = $SCT#47625008
* dosageInstruction.doseAndRate 1..1
* dosageInstruction.doseAndRate.dose[x] 1..1
* dosageInstruction.doseAndRate.dose[x] only SimpleQuantity
* dosageInstruction.doseAndRate.doseQuantity.value 1..1
* dosageInstruction.doseAndRate.doseQuantity = $UCUM#mg/kg

Profile: IBTreatmentGoal
Parent: Goal
Id: ib-treatment-goal
Title: "Infusion Bridge treatment goal"
Description: "A goal of the treatment course (response or remission), measured by the PHQ-9 total score."
* insert Published
* subject only Reference(Patient)
* target 1..*
* target.measure 1..1
* target.measure = $LOINC#44261-6
