"""Independent R4 4.0.1 checks of emitted resources, for tests: fhirkit-rs and the R4B models."""

from __future__ import annotations

from typing import Any

import fhirkit
import orjson
from fhir.resources.R4B import get_fhir_model_class


def r4_errors(resource: dict[str, Any]) -> list[str]:
    """Every error fhirkit-rs (a Rust R4 4.0.1 validator) finds, with its path."""
    issues = fhirkit.validate(orjson.dumps(resource))
    return [f"{issue.path}: {issue.message}" for issue in issues if issue.severity == "error"]


def assert_valid_r4(resource: dict[str, Any]) -> None:
    errors = r4_errors(resource)
    assert errors == [], f"{resource.get('resourceType')}/{resource.get('id')}: {errors}"
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
