"""The clinic's infusion records: models, the intake API and record persistence."""
