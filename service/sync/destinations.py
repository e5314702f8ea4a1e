"""EHR destinations, as the site configures them in the YAML file named by `DESTINATIONS_FILE`.

Pure configuration: these models parse and check the file; nothing here opens a connection.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StrictBool,
    ValidationError,
    field_validator,
)


class DestinationsError(ValueError):
    """The destinations file cannot be read or does not describe valid destinations."""


class Strategy(StrEnum):
    """How one resource type is delivered to one EHR."""

    transaction = "transaction"
    """Transaction Bundles of conditional updates by business identifier."""
    conditional_update = "conditional-update"
    """One `PUT Type?identifier=...` per resource."""
    ledger = "ledger"
    """Plain create, then update by the remote id kept in the delivery ledger (no conditional
    interactions on the EHR); a search by identifier before each create guards against a
    create whose answer was lost."""
    document_reference = "document-reference"
    """The EHR cannot take the type: a DocumentReference with a readable summary instead."""
    unsupported = "unsupported"
    """Neither the type nor a fallback can be delivered: recorded, not sent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoAuth(_Strict):
    type: Literal["none"] = "none"


class BearerAuth(_Strict):
    type: Literal["bearer"]
    token: str = Field(min_length=1)


class SmartBackendAuth(_Strict):
    """SMART Backend Services: client_credentials with a private_key_jwt assertion."""

    type: Literal["smart-backend"]
    client_id: str = Field(min_length=1)
    private_key: Path
    """PEM file of an RSA (RS384) or EC P-384 (ES384) private key."""
    key_id: str | None = None
    """`kid` in the assertion's header, naming the key in the client's published JWKS."""
    scope: str = Field(min_length=1)
    token_url: HttpUrl | None = None
    """Default: `token_endpoint` from `{base_url}/.well-known/smart-configuration`."""


Auth = Annotated[NoAuth | BearerAuth | SmartBackendAuth, Field(discriminator="type")]


class PatientMatching(_Strict):
    """How the EHR's Patient is found: by the identifier our patient carries in this system."""

    match_identifier_system: str = Field(min_length=1)
    create_missing: bool = False
    """Create the Patient in the EHR when no match is found (off: such changes wait as dead
    letters until the EHR registers the patient and they are retried)."""


class CarePlanSync(_Strict):
    """How CarePlans are pulled back from the EHR: polled, and from Subscription notifications."""

    poll_interval_seconds: float = Field(default=60, gt=0)
    category: str | None = None
    """Poll `CarePlan?category=` (token) rather than every CarePlan."""
    by_patient: StrictBool = False
    """Poll `CarePlan?patient=<EHR id>` for each patient matched in this EHR, each with its own
    `_lastUpdated` cursor, for EHRs that search CarePlans only within a patient (Epic, Oracle
    Health). The patients are those delivery has matched to an EHR Patient; off: one search of
    every CarePlan, one cursor."""
    notification_token: str | None = None
    """When set, Subscription notifications must carry `Authorization: Bearer <token>`."""


class Destination(_Strict):
    """One EHR the site delivers to."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    base_url: HttpUrl
    auth: Auth = Field(default_factory=NoAuth)
    send: tuple[str, ...] = ()
    """Resource types to deliver (empty: every type the service emits)."""
    patients: PatientMatching
    strategy: dict[str, Strategy] = Field(default_factory=dict)
    """Overrides per resource type; otherwise chosen from the CapabilityStatement."""
    care_plan_sync: CarePlanSync | None = None
    rate_limit_per_second: float | None = Field(default=None, gt=0)
    timeout_seconds: float = Field(default=30, gt=0)
    backfill: bool = True
    """A new destination gets every change stored so far; false: only changes from now on."""
    max_attempts: int = Field(default=12, ge=1)
    """Transient failures in a row after which a change becomes a dead letter."""

    @property
    def base(self) -> str:
        return str(self.base_url).rstrip("/")

    def sends(self, resource_type: str) -> bool:
        return not self.send or resource_type in self.send

    @field_validator("send")
    @classmethod
    def _types(cls, types: tuple[str, ...]) -> tuple[str, ...]:
        for name in types:
            if not name.isalpha() or not name[0].isupper():
                raise ValueError(f"{name!r} is not a FHIR resource type")
        return types


class DestinationsFile(_Strict):
    destinations: tuple[Destination, ...] = ()

    @field_validator("destinations")
    @classmethod
    def _unique(cls, items: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        return items


def parse_destinations(text: str, *, source: str = "destinations") -> tuple[Destination, ...]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise DestinationsError(f"{source}: not YAML: {error}") from None
    try:
        return DestinationsFile.model_validate(data).destinations
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise DestinationsError(f"{source}: {problems}") from None


def load_destinations(path: Path | None) -> tuple[Destination, ...]:
    """The destinations in the file (none when no file is configured)."""
    if path is None:
        return ()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DestinationsError(f"{path}: {error.strerror}") from None
    return parse_destinations(text, source=str(path))
