"""The one import of typed FHIR models, and the FHIR version on the wire.

`fhir.resources` has no R4 (4.0.1) package; its R4B models match R4 for every resource this
service emits or reads back, so they stand in for R4 here and only here. Mappings emit plain
JSON-ready dicts (see `mappings.context`): building and serializing R4B models costs about 20 times
more per resource than the dicts plus the R4 validator, which sits on the write path. The models
read what EHRs send back (`mappings.reverse`) and check emitted resources in tests.
"""

from __future__ import annotations

from fhir.resources.R4B.careplan import CarePlan
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.fhirresourcemodel import FHIRResourceModel
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.resource import Resource

FHIR_VERSION = "4.0.1"

__all__ = ["FHIR_VERSION", "CarePlan", "Condition", "FHIRResourceModel", "Patient", "Resource"]
