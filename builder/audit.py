"""Audit: which paths each role externalizes, onto which mount point, device and volume.

Pure functions from roles (or registry records, or a live check's report) to rows and
from rows to text; the CLI prints the text.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from builder.roles import Role

FORMATS = ("table", "json", "csv", "markdown")
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


def format_audit(roles: Sequence[Role], fmt: str) -> str:
    """Return the audit of ``roles`` as text in format ``fmt`` (one of FORMATS)."""
    doc = {"schema_version": SCHEMA_VERSION, "roles": [role_record(r) for r in roles]}
    return format_rows(COLUMNS, rows(roles), fmt, doc)


REGISTERED_COLUMNS = ("role", "ami", "created", "fingerprint", "drift", "path", "mount_point", "device")


def format_registered(records: Sequence[Any], region: str, fmt: str) -> str:
    """Return audit --registered (registry.Registered records) in format ``fmt``."""
    table = []
    for record in records:
        base = {c: getattr(record, c, None) or "-" for c in REGISTERED_COLUMNS}
        for path in record.paths or ("-",):
            table.append({**base, "path": path})
    doc = {"schema_version": SCHEMA_VERSION, "region": region, "roles": [asdict(r) for r in records]}
    return format_rows(REGISTERED_COLUMNS, table, fmt, doc)


INSTANCE_COLUMNS = ("state", "check", "subject", "detail")


def format_instance(report: dict[str, Any], fmt: str) -> str:
    """Return audit --instance (a live.check_instance report) in format ``fmt``."""
    return format_rows(INSTANCE_COLUMNS, report["checks"], fmt, {"schema_version": SCHEMA_VERSION, **report})


def format_rows(columns: Sequence[str], records: Sequence[dict[str, Any]], fmt: str, doc: dict[str, Any]) -> str:
    """Return rows as a table, CSV or markdown (one line per row), or ``doc`` as JSON."""
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    table = [[_cell(row[c]) for c in columns] for row in records]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(table)
        return buffer.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in table]
        return "\n".join(lines) + "\n"
    return _plain_table([list(columns), *table])


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _plain_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines) + "\n"
