"""Every rendering of a result for the terminal: text lines and JSON (audit's tables: ``tables``).

Each function takes a command's result (library values) and returns the text to print;
``emit`` prints it. JSON documents keep their keys and shapes: other tools parse them.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from builder.errors import RoleInvalid
    from builder.manifest import Manifest
    from builder.roles import Role


def emit(text: str) -> None:
    """Print ``text`` as one or more lines, flushed (a pipe sees each result when it is made)."""
    print(text, flush=True)


def note(text: str) -> None:
    """Print ``text`` on stderr: a remark beside the result, not the result."""
    print(text, file=sys.stderr)


def as_json(doc: Any) -> str:
    """Return ``doc`` as the indented JSON every command prints."""
    return json.dumps(doc, indent=2)


def invalid(exc: RoleInvalid) -> str:
    """validate --format json when a role is invalid."""
    problems = [{"file": p.file, "key": p.key, "message": p.message} for p in exc.problems]
    return as_json({"valid": False, "problems": problems})


def validated(roles: Sequence[Role], fmt: str) -> str:
    """validate: the roles found valid."""
    if fmt == "json":
        return as_json({"valid": True, "roles": [r.name for r in roles], "problems": []})
    return "\n".join(f"ok  {role.file}" for role in roles)


def built(manifest: Manifest, copies: Sequence[Mapping[str, str]], fmt: str) -> str:
    """build of one role: its AMI, seed snapshot and copies."""
    if fmt == "json":
        record = {
            "role": manifest.role,
            "result": manifest.status,
            "ami": manifest.ami,
            "seed_snapshot": manifest.seed_snapshot,
            "fingerprint": manifest.fingerprint,
            "manifest": str(manifest.path),
            "copies": list(copies),
            "published": manifest.published,
        }
        return as_json({"builds": [record]})
    if manifest.status == "unchanged":
        head = (
            f"{manifest.role}: unchanged: AMI {manifest.ami} seed snapshot {manifest.seed_snapshot} "
            f"(fingerprint {manifest.fingerprint})"
        )
    else:
        head = f"{manifest.role}: AMI {manifest.ami} seed snapshot {manifest.seed_snapshot} (manifest {manifest.path})"
    made = (
        f"{manifest.role}: copied to {c['region']}: AMI {c['ami']} seed snapshot {c['seed_snapshot']}" for c in copies
    )
    return "\n".join((head, *made))


PUBLISH_HINT = (
    "hint: the result stands; to publish it, grant ssm:GetParameters, ssm:PutParameter and "
    "ssm:AddTagsToResource on arn:aws:ssm:*:*:parameter/ebsrole/* and run again (a build with "
    "--if-changed only publishes), or give --no-publish (docs/reference/parameters.md)"
)


def unpublished(published: Iterable[tuple[str, Iterable[Mapping[str, Any]]]]) -> str | None:
    """build, copy, snapshot: a warning per SSM parameter (region, rows) not written or untagged; None: all were."""
    lines = []
    for region, rows in published:
        for row in rows:
            said = f"warning: SSM parameter {row['name'] or '-'} in {region}"
            if row.get("outcome") in ("failed", "not published"):
                lines.append(f"{said} NOT set to {row['value']}: {row['error']}")
            elif row.get("error"):
                lines.append(f"{said} set to {row['value']}, {row['error']}")
    return "\n".join([*lines, PUBLISH_HINT]) if lines else None


def copied(role: str, copies: Sequence[Mapping[str, str]], fmt: str) -> str:
    """copy: the AMI made in each region."""
    if fmt == "json":
        return as_json(copies[0] if len(copies) == 1 else list(copies))
    return "\n".join(
        f"{role}: {c['source_ami']} ({c['source_region']}) -> {c['ami']} in {c['region']}, "
        f"seed snapshot {c['seed_snapshot']}"
        for c in copies
    )


def shared(done: Any, fmt: str) -> str:
    """share: the AMI and snapshots, and whom they were granted to (or revoked from)."""
    if fmt == "json":
        return as_json(asdict(done))
    verb = "revoked from" if done.revoked else "granted to"
    lines = [f"{done.role}: {done.image_id} ({done.region}) launch permission {verb} {', '.join(done.grantees)}"]
    if done.snapshot_grantees:
        lines.append(f"createVolumePermission {verb} them on {' '.join(done.snapshots)}")
    else:
        lines.append("snapshots: createVolumePermission names accounts only; instances launch from the AMI as it is")
    return "\n".join(lines)


def fingerprints(found: Iterable[Any], fmt: str) -> str:
    """fingerprint: one per role."""
    if fmt == "json":
        doc = [{"role": f.role, "fingerprint": f.value, "base_ami": f.base_ami} for f in found]
        return as_json({"fingerprints": doc})
    return "\n".join(f"{f.role}  {f.value}  base {f.base_ami}" for f in found)


def changed(found: Sequence[Any], api_calls: int, fmt: str) -> str | None:
    """changed: the roles to build (None: nothing to print)."""
    names = [c.role for c in found if c.changed]
    if fmt == "github-matrix":
        # `strategy.matrix: ${{ fromJSON(...) }}`; an empty list means there is nothing to build.
        return json.dumps({"role": names}, separators=(",", ":"))
    if fmt == "json":
        rows = [
            {
                "role": c.role,
                "fingerprint": c.fingerprint.value,
                "base_ami": c.fingerprint.base_ami,
                "changed": c.changed,
                "ami": c.image.image_id if c.image else None,
            }
            for c in found
        ]
        return as_json({"changed": names, "roles": rows, "api_calls": api_calls})
    return "\n".join(names) if names else None


def pruned(role: str, rows: Sequence[Any], dry_run: bool, fmt: str) -> str:
    """prune: each AMI's fate."""
    if fmt == "json":
        return as_json({"dry_run": dry_run, "images": [asdict(r) for r in rows]})
    if not rows:
        return f"{role}: no AMIs"
    return "\n".join(f"{r.fate:18} {r.image_id:24} {r.created:26} {r.detail}".rstrip() for r in rows)


def swept(found: Sequence[Any], spared: Sequence[Any], dry_run: bool, fmt: str) -> str:
    """sweep: the leftovers found (and removed unless a dry run)."""
    if fmt == "json":
        return as_json(
            {"dry_run": dry_run, "resources": [asdict(f) for f in found], "spared": [asdict(f) for f in spared]}
        )
    if not found:
        return "nothing to sweep"
    lines = (f"{i.fate:8} {i.kind:16} {i.id:24} build {i.build_id} role {i.role} {i.error}".rstrip() for i in found)
    return "\n".join(lines)


def spared_notes(spared: Sequence[Any]) -> str:
    """sweep: what looked like a leftover, and why it stays."""
    return "\n".join(f"spared {i.kind} {i.id}: {i.reason}" for i in spared)


def volumes(found: Sequence[Any], deleted: bool, fmt: str) -> str:
    """sweep --volumes: the tool's available volumes."""
    if fmt == "json":
        return as_json({"dry_run": not deleted, "volumes": [asdict(v) for v in found]})
    if not found:
        return "no available volumes of the tool"
    lines = [
        f"{v.fate:8} {v.id:24} {v.tool_kind:14} role {v.role or '-'} {v.created_at:20} "
        f"{v.reason or v.error or v.note}".rstrip()
        for v in found
    ]
    if not deleted:
        lines.append("(a list only: add --delete to delete those not spared)")
    return "\n".join(lines)


def sandbox_env(exports: Mapping[str, str], fmt: str) -> str:
    """sandbox env: the exports that point AWS tools at the sandbox."""
    if fmt == "json":
        return as_json(dict(exports))
    names = " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items())
    return f"unset AWS_PROFILE AWS_SESSION_TOKEN\nexport {names}"


def sandbox_capacity(refusals: Mapping[str, Sequence[str]]) -> str:
    """sandbox capacity, as text: what RunInstances refuses, and what it terminates at launch."""
    refuse, late = refusals["refuse"], refusals["refuse_late"]
    if not refuse and not late:
        return "sandbox capacity: nothing refused"
    lines = ["sandbox capacity:"]
    lines += [f"  {p}: RunInstances answers InsufficientInstanceCapacity" for p in refuse]
    lines += [f"  {p}: launched, then terminated (Server.InsufficientInstanceCapacity)" for p in late]
    return "\n".join(lines)


def sandbox_status(status: Mapping[str, Any]) -> str:
    """sandbox status, as text."""
    where = "running, EC2 endpoint " + str(status["endpoint"]) if status["running"] else "not running"
    lines = [f"sandbox: {where} (state {status['state']})"]
    for region, view in status.get("ec2", {}).items():
        states: dict[str, int] = {}
        for state in view["instances"].values():
            states[state] = states.get(state, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"
        lines.append(
            f"  {region}: instances {summary}; volumes {len(view['volumes'])}; "
            f"snapshots {len(view['snapshots'])}; images {len(view['images'])}"
        )
    if status.get("latency"):
        shown = {("preset" if k == "name" else k): v for k, v in status["latency"].items() if v and k != "cv"}
        model = ", ".join(f"{k} {v}" for k, v in shown.items())
        lines.append(f"  latency model: {model}; throttled calls: {status.get('throttled', 0)}")
    lines.append(f"  machines running: {' '.join(status['machines']) or 'none'}")
    lines.append(f"  loop devices: {' '.join(status['loop_devices']) or 'none'}")
    lines.append(f"  mounts: {' '.join(status['mounts']) or 'none'}")
    lines.append(f"  VPC networks: {' '.join(status.get('networks', [])) or 'none'}")
    lines.append(f"  disk used: {status['bytes_on_disk'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def iam_policy(document: Mapping[str, Any], needed: Mapping[str, Sequence[str]], fmt: str) -> str:
    """iam-policy: the policy document (json), or each action with the commands that need it (text)."""
    if fmt == "json":
        return as_json(document)
    width = max((len(a) for a in needed), default=0)
    return "\n".join(f"{action.ljust(width)}  {', '.join(commands)}" for action, commands in needed.items())
