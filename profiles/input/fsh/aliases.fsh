// Code systems, identifier systems and core profiles the definitions refer to.
Alias: $SCT = http://snomed.info/sct
Alias: $LOINC = http://loinc.org
Alias: $RXNORM = http://www.nlm.nih.gov/research/umls/rxnorm
Alias: $ICD10CM = http://hl7.org/fhir/sid/icd-10-cm
Alias: $UCUM = http://unitsofmeasure.org
Alias: $NPI = http://hl7.org/fhir/sid/us-npi
Alias: $ConditionCategory = http://terminology.hl7.org/CodeSystem/condition-category
Alias: $MedAdminCategory = http://terminology.hl7.org/CodeSystem/medication-admin-category
Alias: $ObservationCategory = http://terminology.hl7.org/CodeSystem/observation-category
Alias: $ActCode = http://terminology.hl7.org/CodeSystem/v3-ActCode
Alias: $V2-0203 = http://terminology.hl7.org/CodeSystem/v2-0203
Alias: $minValue = http://hl7.org/fhir/StructureDefinition/minValue
Alias: $maxValue = http://hl7.org/fhir/StructureDefinition/maxValue

// The service's own CodeSystems (published as JSON copies of mappings/terminology).
Alias: $IBCondition = http://infusion-bridge.org/fhir/CodeSystem/condition
Alias: $IBClinicianRole = http://infusion-bridge.org/fhir/CodeSystem/clinician-role
Alias: $IBInstrument = http://infusion-bridge.org/fhir/CodeSystem/instrument
Alias: $IBRatingScale = http://infusion-bridge.org/fhir/CodeSystem/rating-scale
Alias: $IBScoreBand = http://infusion-bridge.org/fhir/CodeSystem/score-band
Alias: $IBAdverseEventKind = http://infusion-bridge.org/fhir/CodeSystem/adverse-event-kind
Alias: $IBInfusionSite = http://infusion-bridge.org/fhir/CodeSystem/infusion-site
Alias: $IBKetamineProduct = http://infusion-bridge.org/fhir/CodeSystem/ketamine-product

// Metadata every published definition carries.
RuleSet: Published
* ^publisher = "Infusion Bridge"
* ^experimental = false
* ^jurisdiction = urn:iso:std:iso:3166#US "United States of America"
