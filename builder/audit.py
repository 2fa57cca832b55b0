"""Audit: which paths each role externalizes, onto which mount point, device and volume.

Pure functions from roles (or registry records, or a live check's report) to records and
flat rows; ``builder.cli.tables`` renders them as a table, JSON, CSV or markdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from builder.roles import Role

SCHEMA_VERSION = 1
COLUMNS = ("role", "path", "target", "mount_point", "device", "size_gib", "type", "filesystem", "encrypted", "created")


def role_record(role: Role) -> dict[str, Any]:
    """Return one role's audit record (the JSON shape, documented in docs/reference/commands.md)."""
    vol = role.volume
    return {
        "role": role.name,
        "file": role.file,
        "description": role.description,
        "mount_point": vol.mount_point,
        "device": vol.device,
        "size_gib": vol.size_gib,
        "type": vol.type,
        "filesystem": vol.filesystem,
        "encrypted": vol.encrypted,
        "services": list(role.services),
        "paths": [
            {
                "path": p.path,
                "target": p.target(vol.mount_point),
                "created": p.created,
                "owner": p.owner,
                "group": p.group,
                "mode": p.mode,
            }
            for p in role.externalize
        ],
    }


def rows(roles: Sequence[Role]) -> list[dict[str, Any]]:
    """Return one flat row per externalized path, in COLUMNS order."""
    out = []
    for record in map(role_record, roles):
        for path in record["paths"]:
            row = {**record, **path}
            out.append({column: row[column] for column in COLUMNS})
    return out


REGISTERED_COLUMNS = ("role", "ami", "created", "fingerprint", "drift", "path", "mount_point", "device")


def document(roles: Sequence[Role]) -> dict[str, Any]:
    """Return the JSON document of ``audit``: every role's record."""
    return {"schema_version": SCHEMA_VERSION, "roles": [role_record(r) for r in roles]}


def registered_rows(records: Sequence[Any]) -> list[dict[str, Any]]:
    """Return audit --registered's rows (registry.Registered records): one per path, ``-`` where unknown."""
    table = []
    for record in records:
        base = {c: getattr(record, c, None) or "-" for c in REGISTERED_COLUMNS}
        for path in record.paths or ("-",):
            table.append({**base, "path": path})
    return table


def registered_document(records: Sequence[Any], region: str) -> dict[str, Any]:
    """Return the JSON document of audit --registered."""
    return {"schema_version": SCHEMA_VERSION, "region": region, "roles": [asdict(r) for r in records]}


INSTANCE_COLUMNS = ("state", "check", "subject", "detail")
