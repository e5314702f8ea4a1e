"""The service's settings: read once from the environment (or a .env file) and injected.

Nothing else in the service reads the environment; the composition root (`service.bootstrap`)
builds everything from one `Settings` object.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
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
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
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
