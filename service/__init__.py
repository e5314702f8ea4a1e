"""Infusion Bridge: a FHIR R4 interoperability service for ketamine infusion clinics."""
