"""audit --instance: check a running instance of a role live, over SSH, with the verify script.

The instance is found by id; its role comes from its AMI's tags; the verify script is
rendered from that role's file and run with sudo, its text sent over stdin (no file on
the instance). The host key must already be in a
known_hosts file (pinned: never trusted on first use).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import paramiko

from builder import tags
from builder.aws.ec2 import EC2
from builder.checks import FAIL, Check
from builder.errors import CloudError, InvalidInput, SSHError
from builder.keys import KeyPair
from builder.reach import Reach
from builder.remote import Remote, known_host_name
from builder.render import render_role
from builder.roles import Role, load_role

log = logging.getLogger(__name__)


def check_instance(
    ec2: EC2,
    instance_id: str,
    roles_dir: Path,
    *,
    identity: Path,
    known_hosts: Path,
    user: str = "admin",
    host: str | None = None,
    port: int = 22,
    reach: Reach | None = None,
) -> dict[str, Any]:
    """Run the role's verify script on the instance; return its checks (state, check, subject, detail).

    ``reach`` says which address and proxy (default: ``host``, else its public IP, else its private one).
    """
    instance = ec2.instance(instance_id)
    if instance.get("State", {}).get("Name") != "running":
        raise CloudError("describe_instances", "IncorrectInstanceState", f"{instance_id} is not running")
    images = ec2.call("describe_images", ImageIds=[instance["ImageId"]])["Images"]
    role_name = tags.parse(images[0]).role if images else None
    if not role_name:
        raise InvalidInput(f"{instance_id} runs {instance['ImageId']}, which is not a role AMI of this tool")
    role = load_role(role_name, roles_dir)
    reach = reach or Reach(host=host)
    address = reach.address(instance)
    host_key = known_host_key(known_hosts, address, port)
    proxy = reach.proxy(address, port, user, instance_id)
    remote = Remote.connect(address, port, user, KeyPair.from_file(identity), host_key, deadline=60, proxy=proxy)
    try:
        checks = verify_checks(remote, role)
    finally:
        remote.close()
    return {
        "instance": instance_id,
        "image": instance["ImageId"],
        "role": role.name,
        "address": address,
        "passed": all(c.ok for c in checks),
        "checks": [asdict(c) for c in checks],
    }


def verify_checks(remote: Remote, role: Role) -> list[Check]:
    """Run the role's verify.sh on the instance; return its checks."""
    verify = next(s for s in render_role(role) if s.name == "verify.sh")
    # Over stdin, never from a file: on a live instance other users may write where a
    # file would go (/var/tmp), and swap it between upload and sudo.
    result = remote.run_script(verify.name, verify.text, timeout=300, on_line=lambda *_: None, check=False)
    checks = []
    for line in result.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) == 4 and fields[0] in ("ok", "FAIL"):
            checks.append(Check(*fields))
    if not checks:
        checks.append(Check(FAIL, "verify", "verify.sh", f"no report (exit {result.exit_status})"))
    return checks


def known_host_key(known_hosts: Path, address: str, port: int) -> str:
    """Return the pinned host key line for ``address`` from ``known_hosts``."""
    keys = paramiko.HostKeys()
    try:
        keys.load(str(known_hosts))
    except OSError as exc:
        raise InvalidInput(f"--known-hosts {known_hosts}: {exc.strerror}") from None
    entry = keys.lookup(known_host_name(address, port))
    if not entry:
        raise SSHError(
            f"no host key for {address} in {known_hosts}: the instance's key must be pinned before the check",
            hint="take it from the instance's console output (aws ec2 get-console-output) and add it there",
        )
    kind = next(iter(entry.keys()))
    return f"{kind} {entry[kind].get_base64()}"
