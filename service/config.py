"""The service's settings: read once from the environment (or a .env file) and injected.

Nothing else in the service reads the environment; the composition root (`service.bootstrap`)
builds everything from one `Settings` object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./var/infusion-bridge.db"


class Settings(BaseSettings):
    """Configuration of the API, the CLI and (later) the delivery worker."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="sqlite:///path (embedded default) or postgresql+psycopg://... (production).",
    )
    database_pool_size: int = Field(default=10, ge=1, le=200)
    database_statement_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="Longest a statement may run on PostgreSQL (0: no limit), and longest a "
        "write waits for SQLite's lock; past it the request is a 503 and nothing is written.",
    )
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text: one line per event, its ids as key=value; json: one object per line.",
    )
    destinations_file: Path | None = Field(
        default=None, description="YAML file of EHR destinations, read by serve and worker."
    )
    site_identifier_system: str = Field(
        default="http://infusion-bridge.org/fhir/sid",
        pattern=r"^(https?://|urn:)\S+$",
        description="Base URI of the site's business identifier systems ({base}/{record kind}).",
    )
    mrn_system: str = Field(
        default="http://infusion-bridge.org/fhir/sid/mrn",
        pattern=r"^(https?://|urn:)\S+$",
        description="Identifier system of the clinic's medical record numbers.",
    )
    organization_name: str = Field(default="Infusion Bridge Clinic", min_length=1)
    terminology_overrides: Path | None = Field(
        default=None,
        description="JSON file of ConceptMaps (one, a list, or a Bundle) overriding code mappings.",
    )
    profiles_dir: Path | None = Field(
        default=None,
        description="The FHIR package of the service's profiles; default: profiles/ of the source "
        "tree, or ./profiles where the service is installed.",
    )
    import_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="Intake import lines committed per transaction."
    )

    # --- security -------------------------------------------------------------------------------
    auth_disabled: bool = Field(
        default=False,
        description="Turn authentication off; `serve` refuses unless bound to a loopback address.",
    )
    auth_issuer: str = Field(
        default="infusion-bridge",
        min_length=1,
        description="iss (and aud) of the access tokens this server issues.",
    )
    auth_signing_key_file: Path | None = Field(
        default=None,
        description="PEM RSA private key signing access tokens; unset: one kept in the database.",
    )
    auth_token_lifetime_seconds: int = Field(default=300, ge=30, le=300)
    auth_external_issuer: str | None = Field(
        default=None, description="A trusted external authorization server's issuer (iss)."
    )
    auth_external_jwks_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    auth_external_audience: str | None = Field(
        default=None, description="The aud external access tokens must carry (this server)."
    )
    public_base_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="The server's public URL, for the token URL client assertions name in aud; "
        "unset: taken from each request.",
    )
    audit_reads: Literal["async", "sync", "off"] = Field(
        default="async",
        description="AuditEvents of reads and searches: committed by the group commit that "
        "follows the answer (async), before the answer is sent (sync), or not written (off). "
        "Writes and refusals are always audited before they are answered.",
    )
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    request_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    rate_limit_per_minute: int = Field(
        default=6000, ge=0, description="Requests per client per minute and process (0: none)."
    )
    rate_limit_burst: int = Field(default=600, ge=1)

    @field_validator("audit_reads", mode="before")
    @classmethod
    def _audit_reads_boolean(cls, value: Any) -> Any:
        """`true` and `false`, as the setting once was, mean `sync` and `off`."""
        if isinstance(value, bool):
            return "sync" if value else "off"
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return "sync"
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no"):
            return "off"
        return value

    @model_validator(mode="after")
    def _external_issuer_complete(self) -> Settings:
        given = (
            self.auth_external_issuer,
            self.auth_external_jwks_url,
            self.auth_external_audience,
        )
        if any(given) and not all(given):
            raise ValueError(
                "AUTH_EXTERNAL_ISSUER, AUTH_EXTERNAL_JWKS_URL and AUTH_EXTERNAL_AUDIENCE are "
                "given together"
            )
        return self

    worker_concurrency: int = Field(
        default=4, ge=1, le=64, description="Lanes (patients) one worker delivers at once."
    )
    worker_batch_size: int = Field(
        default=200, ge=1, le=5000, description="Changes of one lane read and sent together."
    )
    worker_lease_seconds: float = Field(
        default=60, gt=0, description="How long a worker holds a lane before another may take it."
    )
    worker_retry_base_seconds: float = Field(
        default=1.0, gt=0, description="First retry delay; doubled per attempt, with jitter."
    )
    worker_retry_cap_seconds: float = Field(default=300, gt=0)
    worker_idle_seconds: float = Field(
        default=0.5, gt=0, description="Pause between polls of the outbox when it is empty."
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        if not url.startswith(("sqlite://", "postgresql+psycopg://", "postgresql://")):
            raise ValueError("DATABASE_URL must be sqlite:///... or postgresql+psycopg://...")
        if url.startswith("postgresql://"):
            # psycopg 3 is the only PostgreSQL driver installed; say so in the URL.
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        return url

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level
