// Patients, clinicians and the clinic.

Profile: IBPatient
Parent: Patient
Id: ib-patient
Title: "Infusion Bridge Patient"
Description: "A patient of the infusion clinic, as EHRs match and reference it: the clinic's medical record number plus any EHR identifiers, an official name, administrative gender and birth date."
* insert Published
* identifier 1..*
* identifier ^slicing.discriminator.type = #pattern
* identifier ^slicing.discriminator.path = "type"
* identifier ^slicing.rules = #open
* identifier ^slicing.description = "The clinic's MRN, by its identifier type (each site names its own MRN system); EHR identifiers may follow."
* identifier contains mrn 1..1
* identifier[mrn] ^short = "The clinic's medical record number"
* identifier[mrn].type 1..1
* identifier[mrn].type = http://terminology.hl7.org/CodeSystem/v2-0203#MR
* identifier[mrn].system 1..1
* identifier[mrn].value 1..1
* name 1..*
* gender 1..1
* birthDate 1..1

Profile: IBPractitioner
Parent: Practitioner
Id: ib-practitioner
Title: "Infusion Bridge Practitioner"
Description: "A clinician of the infusion clinic (prescriber, supervisor or administering nurse), with the National Provider Identifier when the clinician has one."
* insert Published
* obeys ib-npi-1
* identifier ^slicing.discriminator.type = #value
* identifier ^slicing.discriminator.path = "system"
* identifier ^slicing.rules = #open
* identifier ^slicing.description = "The NPI, sliced by identifier system."
* identifier contains npi 0..1
* identifier[npi] ^short = "National Provider Identifier"
* identifier[npi].system 1..1
* identifier[npi].system = $NPI (exactly)
* identifier[npi].value 1..1
* name 1..*

Invariant: ib-npi-1
Description: "An NPI is ten digits."
Expression: "identifier.where(system = 'http://hl7.org/fhir/sid/us-npi').all(value.matches('^[0-9]{10}$'))"
Severity: #error

Profile: IBOrganization
Parent: Organization
Id: ib-organization
Title: "Infusion Bridge Organization"
Description: "The infusion clinic itself: it manages the patients and is the agent of every record change."
* insert Published
* name 1..1
