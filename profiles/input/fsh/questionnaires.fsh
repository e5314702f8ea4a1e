// Questionnaires of the rating scales, for QuestionnaireResponse.questionnaire. Items carry
// numbers and score ranges only, never the instruments' wording (see each description).

RuleSet: ScoreItem(number, label, max)
* item[+].linkId = "{number}"
* item[=].text = "{label} item {number}"
* item[=].type = #integer
* item[=].required = true
* item[=].extension[+].url = $minValue
* item[=].extension[=].valueInteger = 0
* item[=].extension[+].url = $maxValue
* item[=].extension[=].valueInteger = {max}

RuleSet: ScoreQuestionnaire(id, label, long, code, items, max)
* url = "http://infusion-bridge.org/fhir/Questionnaire/{id}"
* version = "0.1.0"
* title = "{label} item scores"
* status = #active
* subjectType = #Patient
* code = {code}
* description = "Item scores of the {long} ({label}): {items} items, each scored 0 to {max}. The items are identified by number only (linkId 1 to {items}, text '{label} item n'); the instrument's wording is not reproduced, because rights in the wording belong to its authors and publishers, differ per instrument and may require a licence, and the service exchanges item scores only. Clinics present the wording under their own terms."

Instance: phq9
InstanceOf: Questionnaire
Usage: #definition
Title: "PHQ-9 item scores"
* name = "PHQ9"
* insert ScoreQuestionnaire(phq9, PHQ-9, Patient Health Questionnaire-9, $LOINC#44249-1, 9, 3)
* publisher = "Infusion Bridge"
* experimental = false
* jurisdiction = urn:iso:std:iso:3166#US "United States of America"
* insert ScoreItem(1, PHQ-9, 3)
* insert ScoreItem(2, PHQ-9, 3)
* insert ScoreItem(3, PHQ-9, 3)
* insert ScoreItem(4, PHQ-9, 3)
* insert ScoreItem(5, PHQ-9, 3)
* insert ScoreItem(6, PHQ-9, 3)
* insert ScoreItem(7, PHQ-9, 3)
* insert ScoreItem(8, PHQ-9, 3)
* insert ScoreItem(9, PHQ-9, 3)

Instance: gad7
InstanceOf: Questionnaire
Usage: #definition
Title: "GAD-7 item scores"
* name = "GAD7"
* insert ScoreQuestionnaire(gad7, GAD-7, Generalized Anxiety Disorder-7, $LOINC#69737-5, 7, 3)
* publisher = "Infusion Bridge"
* experimental = false
* jurisdiction = urn:iso:std:iso:3166#US "United States of America"
* insert ScoreItem(1, GAD-7, 3)
* insert ScoreItem(2, GAD-7, 3)
* insert ScoreItem(3, GAD-7, 3)
* insert ScoreItem(4, GAD-7, 3)
* insert ScoreItem(5, GAD-7, 3)
* insert ScoreItem(6, GAD-7, 3)
* insert ScoreItem(7, GAD-7, 3)

Instance: pcl5
InstanceOf: Questionnaire
Usage: #definition
Title: "PCL-5 item scores"
* name = "PCL5"
* insert ScoreQuestionnaire(pcl5, PCL-5, PTSD Checklist for DSM-5, $LOINC#101697-1, 20, 4)
* publisher = "Infusion Bridge"
* experimental = false
* jurisdiction = urn:iso:std:iso:3166#US "United States of America"
* insert ScoreItem(1, PCL-5, 4)
* insert ScoreItem(2, PCL-5, 4)
* insert ScoreItem(3, PCL-5, 4)
* insert ScoreItem(4, PCL-5, 4)
* insert ScoreItem(5, PCL-5, 4)
* insert ScoreItem(6, PCL-5, 4)
* insert ScoreItem(7, PCL-5, 4)
* insert ScoreItem(8, PCL-5, 4)
* insert ScoreItem(9, PCL-5, 4)
* insert ScoreItem(10, PCL-5, 4)
* insert ScoreItem(11, PCL-5, 4)
* insert ScoreItem(12, PCL-5, 4)
* insert ScoreItem(13, PCL-5, 4)
* insert ScoreItem(14, PCL-5, 4)
* insert ScoreItem(15, PCL-5, 4)
* insert ScoreItem(16, PCL-5, 4)
* insert ScoreItem(17, PCL-5, 4)
* insert ScoreItem(18, PCL-5, 4)
* insert ScoreItem(19, PCL-5, 4)
* insert ScoreItem(20, PCL-5, 4)

Instance: madrs
InstanceOf: Questionnaire
Usage: #definition
Title: "MADRS item scores"
* name = "MADRS"
* insert ScoreQuestionnaire(madrs, MADRS, Montgomery-Asberg Depression Rating Scale, $IBRatingScale#madrs, 10, 6)
* publisher = "Infusion Bridge"
* experimental = false
* jurisdiction = urn:iso:std:iso:3166#US "United States of America"
* insert ScoreItem(1, MADRS, 6)
* insert ScoreItem(2, MADRS, 6)
* insert ScoreItem(3, MADRS, 6)
* insert ScoreItem(4, MADRS, 6)
* insert ScoreItem(5, MADRS, 6)
* insert ScoreItem(6, MADRS, 6)
* insert ScoreItem(7, MADRS, 6)
* insert ScoreItem(8, MADRS, 6)
* insert ScoreItem(9, MADRS, 6)
* insert ScoreItem(10, MADRS, 6)

Instance: cadss
InstanceOf: Questionnaire
Usage: #definition
Title: "CADSS item scores"
* name = "CADSS"
* insert ScoreQuestionnaire(cadss, CADSS, Clinician-Administered Dissociative States Scale, $IBRatingScale#cadss, 23, 4)
* publisher = "Infusion Bridge"
* experimental = false
* jurisdiction = urn:iso:std:iso:3166#US "United States of America"
* insert ScoreItem(1, CADSS, 4)
* insert ScoreItem(2, CADSS, 4)
* insert ScoreItem(3, CADSS, 4)
* insert ScoreItem(4, CADSS, 4)
* insert ScoreItem(5, CADSS, 4)
* insert ScoreItem(6, CADSS, 4)
* insert ScoreItem(7, CADSS, 4)
* insert ScoreItem(8, CADSS, 4)
* insert ScoreItem(9, CADSS, 4)
* insert ScoreItem(10, CADSS, 4)
* insert ScoreItem(11, CADSS, 4)
* insert ScoreItem(12, CADSS, 4)
* insert ScoreItem(13, CADSS, 4)
* insert ScoreItem(14, CADSS, 4)
* insert ScoreItem(15, CADSS, 4)
* insert ScoreItem(16, CADSS, 4)
* insert ScoreItem(17, CADSS, 4)
* insert ScoreItem(18, CADSS, 4)
* insert ScoreItem(19, CADSS, 4)
* insert ScoreItem(20, CADSS, 4)
* insert ScoreItem(21, CADSS, 4)
* insert ScoreItem(22, CADSS, 4)
* insert ScoreItem(23, CADSS, 4)
