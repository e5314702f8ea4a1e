// ValueSets the profiles bind. The CodeSystems are the JSON files in mappings/terminology, copied
// unchanged into the package by build.py, which also writes one all-codes ValueSet per CodeSystem
// (same id: the sourceUri of the ConceptMaps) unless one is defined here, as score-band is.

ValueSet: IndicationSnomed
Id: indication-snomed
Title: "Indications in SNOMED CT"
Description: "The SNOMED CT disorders the clinic treats with ketamine infusions: the targets of ConceptMap condition."
* insert Published
* $SCT#66344007 "Recurrent major depression"
* $SCT#36923009 "Major depression, single episode"
* $SCT#47505003 "Posttraumatic stress disorder"
* $SCT#21897009 "Generalized anxiety disorder"
* $SCT#767631007 "Bipolar disorder, most recent episode depression"
* $SCT#371631005 "Panic disorder"
* $SCT#386810004 "Phobic disorder"

ValueSet: ScoreCode
Id: score-code
Title: "Rating-scale total scores"
Description: "Codes of the rating-scale totals the clinic records: LOINC where a code exists, the service's rating-scale CodeSystem otherwise (the targets of ConceptMap instrument-total)."
* insert Published
* $LOINC#44261-6 "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]"
* $LOINC#70274-6 "Generalized anxiety disorder 7 item (GAD-7) total score [Reported.PHQ]"
* $LOINC#101698-9 "Posttraumatic stress disorder checklist for DSM-5 total score"
* $IBRatingScale#madrs-total "MADRS total score"
* $IBRatingScale#cadss-total "CADSS total score"

ValueSet: ScoreBand
Id: score-band
Title: "Score severity bands"
Description: "All interpretation bands of rating-scale totals."
* insert Published
* include codes from system $IBScoreBand

ValueSet: AdverseEventCode
Id: adverse-event-code
Title: "Infusion adverse event codes"
Description: "Codes of infusion side effects: the service's adverse-event-kind codes and the SNOMED CT codes they map to (ConceptMap adverse-event)."
* insert Published
* include codes from system $IBAdverseEventKind
* $SCT#422587007 "Nausea"
* $SCT#38341003 "Hypertensive disorder, systemic arterial"

ValueSet: InfusionSiteCode
Id: infusion-site-code
Title: "Infusion site codes"
Description: "Where the IV line was placed: the service's infusion-site codes and the SNOMED CT body structures they map to (ConceptMap infusion-site)."
* insert Published
* include codes from system $IBInfusionSite
* $SCT#14975008 "Forearm structure"
* $SCT#49852007 "Structure of median cubital vein"
