// Rating-scale scores: the total as an Observation, the item answers as a QuestionnaireResponse.

Profile: IBScoreObservation
Parent: Observation
Id: ib-score-observation
Title: "Infusion Bridge rating-scale score"
Description: "The total score of a rating scale (PHQ-9, GAD-7, PCL-5, MADRS, CADSS) as a survey Observation, with its severity band, derived from the QuestionnaireResponse of the item answers."
* insert Published
* category 1..*
* category ^slicing.discriminator.type = #pattern
* category ^slicing.discriminator.path = "$this"
* category ^slicing.rules = #open
* category ^slicing.description = "The survey category; others may follow."
* category contains survey 1..1
* category[survey] = $ObservationCategory#survey
* code from ScoreCode (required)
* subject 1..1
* subject only Reference(Patient)
* value[x] 1..1
* value[x] only integer
* interpretation from ScoreBand (required)

Profile: IBScoreQuestionnaireResponse
Parent: QuestionnaireResponse
Id: ib-score-questionnaireresponse
Title: "Infusion Bridge rating-scale answers"
Description: "The item scores of one completed rating scale, answering the instrument's Questionnaire."
* insert Published
* questionnaire 1..1
* status = #completed (exactly)
* subject 1..1
* subject only Reference(Patient)
* authored 1..1
* item.answer.value[x] only integer
