"""SMART scopes: parsing v1 and v2 system scopes and deciding what they allow. Pure.

    system/Observation.read      v1: read and search (r, s)
    system/*.write               v1: create, update, delete (c, u, d) on every FHIR type
    system/Observation.rs        v2: any subset of c, r, u, d, s in that order
    system/CarePlan.cu
    system/intake.read|write     the intake API (GET; PUT and import)
    system/sync.read|write       the EHR delivery admin API (GET; retries, skips, notifications)

`*` stands for every FHIR resource type except AuditEvent: the audit trail is readable only by a
client granted `system/AuditEvent.*` by name. `intake` and `sync` are API areas, not resource
types; a wildcard does not reach them either. v2 query parameters on a scope (`?category=...`)
narrow what it grants; they are not supported, so such a scope grants nothing (and is refused when
requested). Scopes of other contexts (`patient/`, `user/`, `launch`, `openid`) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

PERMISSIONS: Final = "cruds"
"""The v2 permission letters in their canonical order."""
V1_ACTIONS: Final = {"read": "rs", "write": "cud", "*": "cruds"}
AUDIT_TYPE: Final = "AuditEvent"
API_AREAS: Final = ("intake", "sync")
"""Scope 'types' that name an API area of this service rather than a FHIR resource type."""

_SCOPE = re.compile(r"^system/(?P<type>\*|[A-Za-z]{1,64})\.(?P<action>[a-z*]{1,5})$")


class InvalidScope(ValueError):
    """A requested scope this server does not understand."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One scope, parsed: a type (or `*`) and the permission letters it grants."""

    type: str
    permissions: frozenset[str]


def parse_scope(text: str) -> Grant:
    """One system scope, v1 or v2; InvalidScope for anything else."""
    match = _SCOPE.match(text)
    if match is None:
        raise InvalidScope(f"{text!r} is not a system scope this server supports")
    action = match["action"]
    letters = V1_ACTIONS.get(action)
    if letters is None:
        if not _is_v2(action):
            raise InvalidScope(f"{text!r}: {action!r} is neither read/write/* nor c,r,u,d,s")
        letters = action
    return Grant(match["type"], frozenset(letters))


def _is_v2(action: str) -> bool:
    """Letters from `cruds`, each at most once, in that order."""
    position = -1
    for letter in action:
        index = PERMISSIONS.find(letter)
        if index <= position:
            return False
        position = index
    return bool(action)


@dataclass(frozen=True)
class Scopes:
    """The scopes an access token carries, and what they allow."""

    text: tuple[str, ...]
    grants: tuple[Grant, ...]

    @classmethod
    def parse(cls, scope: str | Iterable[str], *, strict: bool = False) -> Scopes:
        """Scopes from a space-separated string; unknown ones dropped (or refused when strict)."""
        items = scope.split() if isinstance(scope, str) else list(scope)
        grants, kept = [], []
        for item in dict.fromkeys(items):
            try:
                grants.append(parse_scope(item))
                kept.append(item)
            except InvalidScope:
                if strict:
                    raise
        return cls(tuple(kept), tuple(grants))

    def allows(self, resource_type: str, permission: str) -> bool:
        """Whether one permission letter (c, r, u, d, s) is granted on a FHIR type or API area."""
        for grant in self.grants:
            if permission not in grant.permissions:
                continue
            if grant.type == resource_type:
                return True
            if grant.type == "*" and resource_type != AUDIT_TYPE and resource_type not in API_AREAS:
                return True
        return False

    def allows_any(self, resource_type: str) -> bool:
        return any(self.allows(resource_type, letter) for letter in PERMISSIONS)

    def within(self, allowed: Scopes) -> bool:
        """Whether every grant here is covered by `allowed` (a client's registered scopes)."""
        for grant in self.grants:
            for letter in grant.permissions:
                if grant.type == "*":
                    if not any(g.type == "*" and letter in g.permissions for g in allowed.grants):
                        return False
                elif not allowed.allows(grant.type, letter):
                    return False
        return True

    def __str__(self) -> str:
        return " ".join(self.text)


def scope_name(resource_type: str, permission: str) -> str:
    """The v2 scope that grants one permission, for error messages."""
    return f"system/{resource_type}.{permission}"
