"""The SQL schema, as SQLAlchemy Core tables. Alembic migrations create it; nothing else does.

`records` holds the current version of each intake record as canonical JSON text (served back as
stored); `record_changes` keeps every version with who changed it, when, and a JSON Patch from the
previous version, numbered by a global sequence so later stages can map and deliver every change.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects import postgresql

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC timestamp on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
Id = BigInteger().with_variant(Integer(), "sqlite")

records = Table(
    "records",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("external_id", String(64), nullable=False),
    Column("patient_id", String(64), nullable=True, comment="The patient's external id."),
    Column("course_id", String(64), nullable=True, comment="The course's external id."),
    Column("version", Integer, nullable=False),
    Column("content_hash", String(64), nullable=False, comment="SHA-256 of the canonical body."),
    Column("body", Text, nullable=False, comment="Canonical record JSON, served as stored."),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("updated_by", String(200), nullable=False),
    UniqueConstraint("kind", "external_id"),
    Index(None, "kind", "patient_id", "external_id"),
    Index(None, "kind", "course_id", "external_id"),
)

record_changes = Table(
    "record_changes",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True, comment="Global change sequence."),
    Column("kind", String(16), nullable=False),
    Column("external_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("operation", String(8), nullable=False, comment="create or update"),
    Column("changed_at", UtcDateTime, nullable=False),
    Column("changed_by", String(200), nullable=False),
    Column("request_id", String(64), nullable=True),
    Column("patch", Text, nullable=True, comment="RFC 6902 JSON Patch from the previous version."),
    Column("body", Text, nullable=False, comment="The record as of this version."),
    UniqueConstraint("kind", "external_id", "version"),
)

# --- FHIR resources materialized from records -------------------------------------------------

resources = Table(
    "resources",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("last_updated", UtcDateTime, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column(
        "content_hash", String(64), nullable=False, comment="SHA-256 without versionId/lastUpdated."
    ),
    Column("body", Text, nullable=False, comment="The resource JSON as served, meta included."),
)
"""The current version of every resource; a read serves `body` as stored."""

resource_versions = Table(
    "resource_versions",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("last_updated", UtcDateTime, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("body", Text, nullable=True, comment="Null for a deletion."),
)
"""Every version of every resource, for vread and history."""

record_resources = Table(
    "record_resources",
    metadata,
    Column("record_kind", String(16), primary_key=True),
    Column("record_id", String(64), primary_key=True),
    Column("resource_type", String(64), primary_key=True),
    Column("resource_id", String(64), primary_key=True),
    # Which record a resource came from (delivery's readable summaries look this up).
    Index(None, "resource_type", "resource_id"),
)
"""Which resources each record maps to, so a resource the record no longer yields is deleted."""

outbox = Table(
    "outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True, comment="Delivery order."),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("patient_id", String(64), nullable=True, comment="Patient resource id, for ordering."),
    Column("created_at", UtcDateTime, nullable=False),
)
"""One row per resource version written, in the same transaction, for delivery to EHRs."""

# --- search index: rows extracted from each current resource version at write time -------------

# Byte-wise comparison on PostgreSQL: equality, prefix ranges and their indexes do not depend on
# the database's locale (SQLite compares bytes already).
SearchText = String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql")


def _index_table(
    name: str, *columns: Column[Any], lookup: tuple[str, ...], covering: tuple[str, ...] = ()
) -> Table:
    """An index table; `covering` names columns a search also compares, kept last in both
    indexes so that a search reads the indexes alone, never the table's rows."""
    table = Table(
        name,
        metadata,
        Column("resource_type", String(64), nullable=False),
        Column("resource_id", String(64), nullable=False),
        Column("param", String(64), nullable=False),
        *columns,
    )
    extra = [table.c[column] for column in covering]
    Index(
        f"ix_{name}_lookup",
        table.c.resource_type,
        table.c.param,
        *lookup,
        table.c.resource_id,
        *extra,
    )
    # Leading with the resource: a search's per-candidate probe reads this index alone.
    Index(
        f"ix_{name}_resource",
        table.c.resource_type,
        table.c.resource_id,
        table.c.param,
        *(table.c[column] for column in lookup),
        *extra,
    )
    return table


search_string = _index_table(
    "search_string",
    Column("value", SearchText, nullable=False, comment="Case- and accent-folded."),
    Column("exact", SearchText, nullable=False, comment="As written, for :exact."),
    lookup=("value",),
)
search_token = _index_table(
    "search_token",
    Column("system", SearchText, nullable=True),
    Column("code", SearchText, nullable=True),
    Column("text", SearchText, nullable=True, comment="Display or text, folded, for :text."),
    lookup=("code", "system"),
)
search_date = _index_table(
    "search_date",
    Column("low", UtcDateTime, nullable=False, comment="Inclusive lower bound."),
    Column("high", UtcDateTime, nullable=False, comment="Inclusive upper bound."),
    lookup=("low", "high"),
)
search_reference = _index_table(
    "search_reference",
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(64), nullable=True),
    Column("url", SearchText, nullable=True, comment="Absolute URL or canonical, as written."),
    lookup=("target_id", "target_type"),
    covering=("url",),  # whether the target is this server's (`search.local_targets`)
)
Index("ix_search_reference_target", search_reference.c.target_type, search_reference.c.target_id)
search_quantity = _index_table(
    "search_quantity",
    Column("value", Float(53), nullable=False),
    Column("system", SearchText, nullable=True),
    Column("code", SearchText, nullable=True),
    lookup=("value",),
)
search_composite = _index_table(
    "search_composite",
    Column("system", SearchText, nullable=True, comment="The first part, a token."),
    Column("code", SearchText, nullable=False),
    Column("value_system", SearchText, nullable=True, comment="A token's or quantity's."),
    Column("value_code", SearchText, nullable=True, comment="A token's, or a quantity's unit."),
    Column("value_number", Float(53), nullable=True, comment="A quantity's value."),
    Column("value_low", UtcDateTime, nullable=True, comment="A date's, inclusive."),
    Column("value_high", UtcDateTime, nullable=True, comment="A date's, inclusive."),
    Column("value_text", SearchText, nullable=True, comment="A string's, folded."),
    lookup=("code", "system"),
)
"""Composite parameters (`code-value-quantity`): one row per selected element (the resource or
an `Observation.component`) and combination of its two parts' values, so both parts of a match
come from the same element. The second part fills the columns of its type."""
Index(None, resources.c.resource_type, resources.c.last_updated)

# --- Bulk Data $export jobs: shared by every API process --------------------------------------

export_jobs = Table(
    "export_jobs",
    metadata,
    Column("id", String(36), primary_key=True, comment="The job id in the status URL."),
    Column("level", String(16), nullable=False, comment="system or patient"),
    Column("request", Text, nullable=False, comment="The kick-off request URL, for the manifest."),
    Column("types", Text, nullable=False, comment="Comma-separated resource types exported."),
    Column("since", UtcDateTime, nullable=True, comment="_since: lastUpdated at or after it."),
    Column(
        "transaction_time",
        UtcDateTime,
        nullable=False,
        comment="The snapshot instant: each file serves the versions current at it.",
    ),
    Column("status", String(16), nullable=False, comment="in-progress or complete"),
    Column("progress", String(200), nullable=True, comment="X-Progress while in progress."),
    Column(
        "claimed_at",
        UtcDateTime,
        nullable=False,
        comment="When a process last took up the job's work; a stale claim is taken over.",
    ),
    Column("counts", Text, nullable=True, comment="JSON {type: count} once complete."),
    Column("created_at", UtcDateTime, nullable=False),
    Column("completed_at", UtcDateTime, nullable=True),
    Column(
        "client_id",
        String(200),
        nullable=True,
        comment="The client that started the job; only it sees the status and files.",
    ),
)
"""One row per Bulk Data export; the files are streamed from the store when downloaded."""

# --- security: registered clients, seen client assertions, the token signing key --------------

clients = Table(
    "clients",
    metadata,
    Column("id", String(200), primary_key=True, comment="The client id (iss and sub it signs)."),
    Column("jwks", Text, nullable=True, comment="The client's public keys, a JWK Set as JSON."),
    Column("jwks_url", String(2000), nullable=True, comment="Where its JWK Set is published."),
    Column("scope", Text, nullable=False, comment="Space-separated scopes it may be granted."),
    Column("created_at", UtcDateTime, nullable=False),
)
"""SMART Backend Services clients, registered with `infusion-bridge clients add`."""

client_assertions = Table(
    "client_assertions",
    metadata,
    Column("client_id", String(200), primary_key=True),
    Column("jti", String(200), primary_key=True),
    Column("expires_at", UtcDateTime, nullable=False, index=True),
)
"""Every client assertion's jti until it expires: the primary key refuses a replay, in any
process."""

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("private_pem", Text, nullable=False, comment="PKCS#8 PEM of the RS384 key."),
    Column("created_at", UtcDateTime, nullable=False),
)
"""The key that signs access tokens when none is configured, shared by every API process."""

# --- EHR delivery and care-plan sync (service.sync) ---------------------------------------------

sync_destinations = Table(
    "sync_destinations",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("outbox_cursor", BigInteger, nullable=False, comment="Last outbox id fanned out."),
    Column("strategies", Text, nullable=True, comment="JSON {type: strategy} last chosen."),
    Column("capabilities_at", UtcDateTime, nullable=True),
    Column("care_plan_cursor", String(64), nullable=True, comment="Newest _lastUpdated pulled."),
    Column("last_pull_at", UtcDateTime, nullable=True),
    Column("pull_requested", Boolean, nullable=False, comment="A catch-up poll is due."),
    Column("subscription_events", BigInteger, nullable=True, comment="Last event number seen."),
    Column("last_notification_at", UtcDateTime, nullable=True),
    Column("last_success_at", UtcDateTime, nullable=True),
    Column("last_failure_at", UtcDateTime, nullable=True),
    Column("last_error", Text, nullable=True, comment="Status and message, no patient data."),
)
"""Per destination: how far the outbox is fanned out, the strategies, the care-plan cursors."""

sync_pull_cursors = Table(
    "sync_pull_cursors",
    metadata,
    Column("destination", String(64), primary_key=True),
    Column("remote_patient_id", String(64), primary_key=True, comment="The EHR's Patient id."),
    Column("cursor", String(64), nullable=False, comment="Newest _lastUpdated pulled."),
    Column("updated_at", UtcDateTime, nullable=False),
)
"""Care-plan cursors of destinations polled per patient (`care_plan_sync.by_patient`)."""

sync_deliveries = Table(
    "sync_deliveries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("destination", String(64), nullable=False),
    Column("lane", String(140), nullable=False, comment="Patient id (or type/id): one order."),
    Column("outbox_id", BigInteger, nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column(
        "status",
        String(16),
        nullable=False,
        comment="pending, delivered, dead, skipped, superseded, echo, unsupported",
    ),
    Column("strategy", String(32), nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UtcDateTime, nullable=False),
    Column("written_at", UtcDateTime, nullable=False, comment="When the change was stored."),
    Column("finished_at", UtcDateTime, nullable=True),
    Column("latency_ms", Integer, nullable=True, comment="Written to accepted by the EHR."),
    Column("error", Text, nullable=True),
    Column("outcome", Text, nullable=True, comment="The EHR's OperationOutcome, as JSON."),
    UniqueConstraint("destination", "outbox_id"),
    Index(None, "destination", "lane", "status", "id"),
    Index(None, "destination", "status", "id"),
)
"""One row per outbox change per destination, from fan-out to its end."""

sync_delivery_totals = Table(
    "sync_delivery_totals",
    metadata,
    Column("destination", String(64), primary_key=True),
    Column("status", String(16), primary_key=True, comment="An end: delivered, skipped, ..."),
    Column(
        "latency_bucket_ms",
        Integer,
        primary_key=True,
        comment="Delivered: the least latency bucket bound (ms) the latency is within; else -1.",
    ),
    Column("deliveries", BigInteger, nullable=False),
    Column("latency_ms", BigInteger, nullable=False, comment="Their latencies' sum."),
)
"""Deliveries that ended, counted as they end (in the transaction that ends them), so status
and `/metrics` read a few rows per destination instead of every delivery ever made. Dead letters
are not counted here (they can be retried): they are counted in `sync_deliveries`."""

sync_lanes = Table(
    "sync_lanes",
    metadata,
    Column("destination", String(64), primary_key=True),
    Column("lane", String(140), primary_key=True),
    Column("next_due", UtcDateTime, nullable=True, comment="Its first pending change is due."),
    Column("leased_until", UtcDateTime, nullable=True),
    Column("leased_by", String(64), nullable=True),
    Index(None, "destination", "next_due"),
)
"""A patient's changes for one destination, leased by one worker at a time: they stay in order."""

sync_ledger = Table(
    "sync_ledger",
    metadata,
    Column("destination", String(64), primary_key=True),
    Column("resource_type", String(64), primary_key=True),
    Column("resource_id", String(64), primary_key=True),
    Column("remote_type", String(64), nullable=False),
    Column("remote_id", String(64), nullable=False),
    Column("remote_version", String(64), nullable=True, comment="Its version we wrote or read."),
    Column("pushed_version", Integer, nullable=True, comment="Our version the EHR holds."),
    Column("origin_version", Integer, nullable=True, comment="Our version pulled from the EHR."),
    Column("updated_at", UtcDateTime, nullable=False),
    Index(None, "destination", "remote_type", "remote_id"),
)
"""Which EHR resource each of ours is (the matched Patient too): no create is repeated."""

sync_conflicts = Table(
    "sync_conflicts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("destination", String(64), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("record_kind", String(16), nullable=False),
    Column("record_id", String(64), nullable=False),
    Column("field", String(200), nullable=False),
    Column("clinic_value", Text, nullable=True, comment="JSON"),
    Column("ehr_value", Text, nullable=True, comment="JSON"),
    Column("base_value", Text, nullable=True, comment="JSON: the value both last agreed on."),
    Column("remote_version", String(64), nullable=True),
    Column("status", String(16), nullable=False, comment="open or resolved"),
    Column("detected_at", UtcDateTime, nullable=False),
    Column("resolved_at", UtcDateTime, nullable=True),
    Index(None, "status", "id"),
)
"""Fields both the clinic and the EHR changed since they last agreed: kept, never overwritten."""
