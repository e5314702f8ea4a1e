"""The FHIR side of the service: validation now, the REST facade later."""
