"""Restore drills: restore a snapshot into another AZ, check it over SSH, remove it all, report.

A drill proves a backup restores: the data is the snapshotted data (its marker), the
role's services run, a web role answers HTTP. Everything it makes carries the drill's tags,
so `sweep --build-id` finds it after a kill.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from builder import tags
from builder.aws import resources
from builder.aws.ec2 import EC2
from builder.backups import MARKER
from builder.checks import Check
from builder.cleanup import UndoStack
from builder.errors import BuildError, CloudError, InvalidInput
from builder.keys import KeyPair
from builder.launch import (
    Source,
    check_volume_size,
    choose_source,
    connect,
    current_image,
    launch,
    login_user_data,
    zones,
)
from builder.live import verify_checks
from builder.pipeline import new_build_id
from builder.reach import Reach
from builder.registry import RoleImage
from builder.remote import Remote
from builder.roles import Role

WEB_SERVICES = ("apache2", "nginx", "httpd")


@dataclass
class DrillReport:
    role: str
    passed: bool
    snapshot_id: str
    snapshot_kind: str
    snapshot_date: str
    source_az: str
    az: str
    instance_id: str = ""
    seconds_to_verified: float | None = None
    seconds_total: float = 0.0
    checks: list[Check] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    left_behind: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DrillRequest:
    """What a drill asks for: the snapshot to restore (as ``launch`` chooses it), where, how to log in."""

    choice: str = "latest"  # latest | seed | snap-...
    source_env: str = ""
    allow_other_role: bool = False
    az: str | None = None  # default: an AZ other than the snapshot's
    ssh_cidr: str | None = None  # default: see resources.ssh_source
    ssh_source_group: str | None = None  # admit SSH from this group's members instead of a CIDR
    user: str = "admin"
    reach: Reach = field(default_factory=Reach)
    public_ip: bool | None = None  # False: launch without a public IP
    subnet_id: str | None = None  # restore into this subnet: its AZ is the drill's
    volume_size: int | None = None  # GiB of the restored volume (default: the snapshot's); grown into at boot


@dataclass(frozen=True)
class Drilled:
    """A drill's result: the snapshot it restored and its report."""

    source: Source
    report: DrillReport


def run(ec2: EC2, role: Role, request: DrillRequest) -> Drilled:
    """Drill ``role``: resolve its current AMI and the snapshot ``request`` names, then :func:`drill` it.

    Raises like :func:`builder.launch.current_image` and :func:`builder.launch.choose_source`;
    everything after that is in the report.
    """
    reach = request.reach
    if request.public_ip is False:
        reach.refuse_public()
    private = reach.private(public_ip=request.public_ip is not False)  # the AZ's default subnet maps public IPs
    admitted = resources.ssh_source(
        ec2, cidr=request.ssh_cidr, group_id=request.ssh_source_group, private=private, subnet_id=request.subnet_id
    )
    image = current_image(ec2, role.name)
    source = choose_source(
        ec2, role.name, image, request.choice, request.source_env, allow_other_role=request.allow_other_role
    )
    check_volume_size(ec2, source.snapshot_id, request.volume_size)
    report = drill(
        ec2,
        role,
        image,
        source,
        az=request.az,
        ssh_source=admitted,
        user=request.user,
        drill_id=new_build_id(),
        reach=reach,
        public_ip=request.public_ip,
        subnet_id=request.subnet_id,
        volume_size=request.volume_size,
    )
    return Drilled(source, report)


def drill_tags(drill_id: str, role: str) -> dict[str, str]:
    """Return the tags of every temporary resource of a drill: what `sweep` needs to find them after a kill."""
    return tags.drill(drill_id, role)


def drill(
    ec2: EC2,
    role: Role,
    image: RoleImage,
    source: Source,
    *,
    az: str | None,
    ssh_source: resources.SshSource | str,
    user: str = "admin",
    timeout: float = 900,
    drill_id: str,
    reach: Reach | None = None,
    public_ip: bool | None = None,
    subnet_id: str | None = None,
    volume_size: int | None = None,
) -> DrillReport:
    """Restore ``source`` into an AZ other than its own, check it over SSH, remove everything; report.

    SSH is admitted from ``ssh_source`` (a CIDR or :class:`resources.SshSource`) and goes as
    ``reach`` says; ``public_ip`` False launches the instance without a public IP. With
    ``subnet_id`` the instance goes there, and the subnet's AZ is the drill's. ``volume_size``
    (GiB, checked against the snapshot by the caller) makes the restored volume larger.
    """
    started = time.monotonic()
    available = zones(ec2)
    if subnet_id:
        az = resources.subnet_zone(ec2, subnet_id, az)
    if az and az not in available:
        raise InvalidInput(f"--az {az}: not an available AZ of {ec2.region} ({', '.join(available)})")
    target = az or other_zone(ec2, role, source.source_az, available)
    report = DrillReport(role.name, False, source.snapshot_id, source.kind, source.date, source.source_az, target)
    undo = UndoStack()
    common = drill_tags(drill_id, role.name)
    login = KeyPair.generate(f"ebsrole-drill-{drill_id}")
    try:
        group = resources.ssh_group(
            ec2,
            f"ebsrole-drill-{drill_id}",
            f"ebsrole restore drill {drill_id}: SSH from {ssh_source}",
            ssh_source,
            group_tags=tags.with_kind(common, tags.KIND_SECURITY_GROUP),
            undo=undo,
            subnet_id=subnet_id,
        )
        launched = launch(
            ec2,
            role,
            image,
            source,
            az=target,
            env="drill",
            security_group_ids=[group],
            user_data=login_user_data(login),
            extra_tags=tags.with_kind(common, tags.KIND_DRILL),
            delete_data_on_termination=True,
            undo=undo,
            public_ip=public_ip,
            subnet_id=subnet_id,
            volume_size=volume_size,
        )[0]
        report.instance_id = launched.instance_id
        remote = connect(ec2, launched, login, user, timeout, reach=reach)
        try:
            report.checks = _drill_checks(remote, role, image, source)
        finally:
            remote.close()
        report.seconds_to_verified = round(time.monotonic() - started, 1)
        report.reasons = [c.line() for c in report.checks if not c.ok]
        report.passed = not report.reasons
    except BuildError as exc:
        report.reasons.append(str(exc).splitlines()[0])
    finally:
        left = undo.unwind()
        report.left_behind = [f"{r.kind} {r.id}: {r.error}" for r in left]
        report.seconds_total = round(time.monotonic() - started, 1)
    if report.left_behind:
        report.passed = False
    return report


def other_zone(ec2: EC2, role: Role, source_az: str, available: list[str]) -> str:
    """Return the first available AZ other than ``source_az`` that offers one of the role's types.

    Raises CloudError listing the AZs and the types when there is none.
    """
    offered = resources.offered_zones(ec2, role.instance_types)
    offering = {z for zones in offered.values() for z in zones}
    target = next((z for z in available if z != source_az and z in offering), None)
    if target is None:
        others = ", ".join(z for z in available if z != source_az) or "none"
        raise CloudError(
            "describe_instance_type_offerings",
            "Unsupported",
            f"no AZ of {ec2.region} other than {source_az or '(unknown)'} ({others}) offers "
            f"{' or '.join(role.instance_types)}",
            hint="give --az, or add a type offered there to the role's instance_types",
        )
    return target


def _drill_checks(remote: Remote, role: Role, image: RoleImage, source: Source) -> list[Check]:
    """Return the verify script's checks, then the drill's probes: the marker, the services, HTTP."""
    checks = verify_checks(remote, role)
    mount = image.mount_point or role.volume.mount_point
    if source.marker:
        found = remote.run(
            f"sudo -n cat {shlex.quote(mount.rstrip('/') + '/' + MARKER)}", timeout=60, on_line=lambda *_: None
        )
        got = found.stdout.strip()
        state = "ok" if got == source.marker else "FAIL"
        detail = (
            "the data is the snapshotted data"
            if state == "ok"
            else f"marker {got or 'missing'!r}, snapshot says {source.marker!r}"
        )
        checks.append(Check(state, "marker", MARKER, detail))
    for service in role.services:
        active = remote.run(f"systemctl is-active {shlex.quote(service)}", timeout=60, on_line=lambda *_: None)
        state = "ok" if active.stdout.strip() == "active" else "FAIL"
        checks.append(Check(state, "service", service, active.stdout.strip() or "unknown"))
    if any(s.removesuffix(".service") in WEB_SERVICES for s in role.services):
        probe = (
            "python3 -c \"import urllib.request as u; r = u.urlopen('http://127.0.0.1/', timeout=20); "
            'print(r.status, len(r.read()))"'
        )
        answer = ""
        for _ in range(30):  # the service may still be starting
            result = remote.run(probe, timeout=60, on_line=lambda *_: None)
            answer = (
                result.stdout.strip() or result.stderr.strip().splitlines()[-1:][0]
                if (result.stdout or result.stderr)
                else ""
            )
            if result.exit_status == 0:
                break
            time.sleep(1)
        state = "ok" if answer.startswith("200 ") else "FAIL"
        checks.append(Check(state, "http", "http://127.0.0.1/", answer or "no answer"))
    return checks
