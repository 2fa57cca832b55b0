"""Tabular renderings (audit's): an aligned table, CSV or markdown (one line per row), or JSON."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from builder import audit

if TYPE_CHECKING:
    from builder.roles import Role


def roles(found: Sequence[Role], fmt: str) -> str:
    """audit: each role's externalized paths."""
    return rows(audit.COLUMNS, audit.rows(found), fmt, audit.document(found))


def registered(records: Sequence[Any], region: str, fmt: str) -> str:
    """audit --registered: the current AMI of each role, its drift and paths."""
    doc = audit.registered_document(records, region)
    return rows(audit.REGISTERED_COLUMNS, audit.registered_rows(records), fmt, doc)


def instance(report: dict[str, Any], fmt: str) -> str:
    """audit --instance: each check of a live.check_instance report."""
    doc = {"schema_version": audit.SCHEMA_VERSION, **report}
    return rows(audit.INSTANCE_COLUMNS, report["checks"], fmt, doc)


def rows(columns: Sequence[str], records: Sequence[dict[str, Any]], fmt: str, doc: dict[str, Any]) -> str:
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
    return _plain([list(columns), *table])


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _plain(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines) + "\n"
