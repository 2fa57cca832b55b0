"""What every command reads from its options: the roles directory, its roles, where EC2 is.

Nothing here changes ``args``: a value worked out once (the sandbox's endpoint) is returned.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from builder.cli.registry import RESERVED
from builder.errors import InvalidInput, RoleNotFound

if TYPE_CHECKING:
    from builder.aws.ec2 import EC2, AssumedRole
    from builder.roles import Role


@dataclass(frozen=True)
class Target:
    """Where EC2 is: AWS (a region and profile), any endpoint, or the local sandbox."""

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    sandbox: bool = False
    role_arn: str | None = None  # --role-arn: assumed for every call
    external_id: str | None = None
    command: str = "build"  # names the assumed role's session: ebsrole-<command>

    @classmethod
    def of(cls, args: argparse.Namespace) -> Target:
        """Return the target the AWS options of ``args`` name (InvalidInput for a bad --role-arn/--external-id)."""
        from builder.accounts import check_external_id, check_role_arn

        role_arn, external_id = getattr(args, "role_arn", None), getattr(args, "external_id", None)
        if role_arn:
            check_role_arn(role_arn)
        if external_id:
            if not role_arn:
                raise InvalidInput("--external-id goes with --role-arn")
            check_external_id(external_id)
        command = getattr(args, "verb", None) or "build"
        return cls(args.region, args.profile, args.endpoint_url, args.sandbox, role_arn, external_id, command)

    def assumed(self) -> AssumedRole | None:
        """Return the role to assume (--role-arn), or None."""
        from builder.aws.ec2 import AssumedRole

        if not self.role_arn:
            return None
        return AssumedRole(self.role_arn, f"ebsrole-{self.command}", self.external_id)


def connect(target: Target, region: str | None = None) -> EC2:
    """Return the EC2 of ``target`` (``region`` overrides its region: a copy's second region).

    Raises InvalidInput when --sandbox comes with its own endpoint or profile.
    """
    from builder.aws.ec2 import EC2

    if not target.sandbox:
        return EC2.connect(region or target.region, target.profile, target.endpoint_url, assume=target.assumed())
    if target.profile or target.endpoint_url:
        raise InvalidInput("--sandbox is its own endpoint and credentials: drop --endpoint-url and --profile")
    if target.role_arn:
        raise InvalidInput("--sandbox answers its own credentials only: it cannot assume --role-arn")
    from builder.sandbox import control

    current = control.ensure_started()
    ec2 = EC2.connect(
        region or target.region or control.REGION, None, current.endpoint, credentials=control.credentials()
    )
    ec2.wait_scope = current.wait_scope
    return ec2


def connect_args(args: argparse.Namespace, region: str | None = None) -> EC2:
    """Return the EC2 the AWS options of ``args`` name."""
    return connect(Target.of(args), region)


def roles_dir(args: argparse.Namespace) -> Path:
    """Return the roles directory: --roles-dir, or the default."""
    from builder.roles import ROLES_DIR

    return Path(args.roles_dir) if args.roles_dir else ROLES_DIR


def load_roles(where: Path, names: Sequence[str] | None) -> list[Role]:
    """Return the roles ``names`` (all when None or empty) of ``where``; a command is no role name."""
    from builder.roles import load_roles as load

    return load(names, where, reserved=RESERVED)


def load_role(where: Path, name: str) -> Role:
    """Return role ``name`` of the roles directory ``where``."""
    return load_roles(where, [name])[0]


def require_roles(where: Path) -> None:
    """Raise InvalidInput when the roles directory is missing or holds no role: nothing to do is not success."""
    from builder.roles import display_path, role_names

    if not where.is_dir():
        raise InvalidInput(f"{display_path(where)}: no such roles directory", hint="give --roles-dir DIR")
    if not role_names(where):
        raise InvalidInput(f"{display_path(where)}: no role files (ROLE.yaml) in the roles directory")


def require_role_files(where: Path, names: Sequence[str]) -> None:
    """Raise RoleNotFound for a named role without a role file: naming none would do nothing."""
    from builder.roles import display_path, role_names

    known = role_names(where)
    for name in names:
        if name not in known:
            raise RoleNotFound(name, display_path(where), known)


def check_writable_dir(path: Path, what: str) -> None:
    """Raise InvalidInput unless ``path`` is (or can be made) a writable directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ebsrole-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InvalidInput(f"{what}: cannot write in {path}: {exc.strerror}") from None
