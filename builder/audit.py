"""Audit: which paths each role externalizes, onto which mount point, device and volume.

Pure functions from roles to rows and from rows to text; the CLI prints the text.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from builder.roles import Role

FORMATS = ("table", "json", "csv", "markdown")
SCHEMA_VERSION = 1
COLUMNS = ("role", "path", "target", "mount_point", "device", "size_gib", "type", "filesystem", "encrypted", "created")


def role_record(role: Role) -> dict[str, Any]:
    """Return one role's audit record (the JSON shape, documented in the README)."""
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
    if fmt == "json":
        doc = {"schema_version": SCHEMA_VERSION, "roles": [role_record(r) for r in roles]}
        return json.dumps(doc, indent=2) + "\n"
    table = [[_cell(row[c]) for c in COLUMNS] for row in rows(roles)]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(table)
        return buffer.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in table]
        return "\n".join(lines) + "\n"
    return _plain_table([list(COLUMNS), *table])


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
