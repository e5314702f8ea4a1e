"""EHR exchange: delivery of the outbox to configured EHR destinations, and care-plan sync back.

`destinations` reads the destinations file; `client` speaks FHIR to one EHR (auth included);
`strategy` decides, from the EHR's CapabilityStatement and the site's overrides, how each resource
type is delivered; `outbound` turns a stored resource into what one EHR receives (pure);
`ledger` is the SQL side (fan-out, lanes, ledger of remote ids, dead letters, conflicts);
`worker` runs deliveries and polls; `care_plans` pulls plans back into courses; `api` is the
admin router under `/api/v1/sync/`.
"""
