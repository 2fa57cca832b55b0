"""The renderings of snapshot, launch, template and drill results (the others: ``output``; audit's: ``tables``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from builder.cli.output import as_json


def snapshot_failures(results: Sequence[Any]) -> str:
    """snapshot: the error line of each failed snapshot (retention is skipped then)."""
    return "\n".join(
        f"error: {r.role}: snapshot of volume {r.volume_id} ({r.instance_id}) failed: {r.error}; "
        "retention skipped, nothing deleted"
        for r in results
        if r.result == "failed"
    )


def snapshots(
    date: str,
    results: Sequence[Any],
    retention: Sequence[Any],
    fmt: str,
    *,
    latest: Sequence[Any] = (),
    templates: Sequence[Any] | None = None,
) -> str:
    """snapshot: each volume's snapshot, the retention's fates, the published latest snapshots (and the templates)."""
    if fmt == "json":
        doc = {
            "date": date,
            "snapshots": [asdict(r) for r in results],
            "retention": [asdict(r) for r in retention],
            "published": [asdict(p) for p in latest],
        }
        if templates is not None:
            doc["templates"] = [asdict(t) for t in templates]
        return as_json(doc)
    lines = [] if results else ["no running role instances"]
    for r in results:
        frozen = f" {r.frozen_seconds:.3f} s" if r.frozen_seconds is not None else ""
        extra = (f" frozen{frozen}" if r.frozen else "") + (f": {r.error}" if r.error else "")
        if r.thawed_by == "watchdog":
            extra += " (the watchdog thawed it first: the snapshot may be crash-consistent only)"
        lines.append(f"{r.result:8} {r.role:16} {r.instance_id:20} {r.volume_id:22} {r.snapshot_id or '-'}{extra}")
    for k in retention:
        extra = (f" ({k.state})" if k.state != "completed" else "") + (f": {k.error}" if k.error else "")
        lines.append(f"{k.fate:14} {k.snapshot_id:24} {k.volume_id:22} {k.date or '-'}{extra}")
    for p in latest:
        extra = (f": {p.error}" if p.error else "") + (f" ({p.note})" if p.note else "")
        lines.append(f"{p.outcome:14} {p.parameter or '-'} {p.snapshot_id or '-'}{extra}")
    if templates:
        lines.append(template_updates(templates))
    return "\n".join(lines)


def launched(role: str, image: str, source: Any, instances: Sequence[Any], fmt: str) -> str:
    """launch: each instance, where its data came from, whether it verified."""
    if fmt == "json":
        doc = {"role": role, "image": image, "source": asdict(source), "instances": [asdict(i) for i in instances]}
        return as_json(doc)
    states = {None: "", True: " verified", False: " FAILED verify"}
    return "\n".join(
        f"{role}: {i.instance_id} {i.az} {i.address} data from {i.snapshot_id}{states[i.verified]}" for i in instances
    )


def templated(role: str, done: Any, fmt: str) -> str:
    """template: the new default version, its AMI and data, and the group on it."""
    v, source, group = done.version, done.source, done.group
    if fmt == "json":
        doc = {"role": role, "template": asdict(v), "source": asdict(source), "group": asdict(group) if group else None}
        return as_json(doc)
    made = " (new template)" if v.created else ""
    lines = [
        f"{role}: launch template {v.name} ({v.template_id}) version {v.version} is the default{made}: "
        f"{v.image_id}, data from {source.kind} snapshot {v.snapshot_id} ({source.date})"
    ]
    if group is not None:
        sizes = f"min {group.min_size} max {group.max_size} desired {group.desired}"
        lines.append(f"{role}: Auto Scaling group {group.name} {group.done} on {v.name} {group.version}: {sizes}")
        if group.refresh_id:
            lines.append(f"{role}: instance refresh {group.refresh_id} started")
    return "\n".join(lines)


def template_updates(updates: Sequence[Any]) -> str:
    """snapshot --update-template: one line per role and env (on stderr when nothing was updated)."""
    lines = []
    for u in updates:
        where = f"{u.role}{'@' + u.env if u.env else ''}"
        what = f"version {u.version} is the default: data from {u.snapshot_id}" if u.version else u.why
        lines.append(f"template {u.result:9} {where:20} {u.template}: {what}")
    return "\n".join(lines)


def drilled(role: str, source: Any, report: Any, fmt: str) -> str:
    """drill: the verdict, the timings, each check, what was left behind."""
    if fmt == "json":
        return as_json(report.to_dict())
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"{role}: restore drill {verdict}: {source.kind} snapshot {source.snapshot_id} ({source.date}) "
        f"restored in {report.az} (from {report.source_az or '?'})"
    ]
    if report.seconds_to_verified is not None:
        lines.append(f"  restored and verified in {report.seconds_to_verified} s; {report.seconds_total} s in all")
    lines += [f"  {c.state:4} {c.check:10} {c.subject} {c.detail}".rstrip() for c in report.checks]
    lines += [f"  reason: {reason}" for reason in report.reasons]
    lines += [f"  LEFT BEHIND: {left}" for left in report.left_behind]
    return "\n".join(lines)
