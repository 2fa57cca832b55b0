"""validate, render, audit, fingerprint, changed: questions about the role files (and their AMIs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.cli import output
from builder.cli.context import connect_args, load_role, load_roles, require_roles, roles_dir
from builder.cli.options import aws_options, port, reach_options, ssh_login_options
from builder.cli.registry import Parser, add
from builder.errors import ExitCode, InvalidInput, RoleInvalid


def add_parsers(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """Add the parsers of validate, render, audit, fingerprint and changed."""
    p = add(sub, "validate", common)
    p.add_argument("roles", nargs="*", metavar="ROLE")
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = add(sub, "render", common)
    p.add_argument("role", metavar="ROLE")
    p.add_argument("--out", type=Path, help="write the scripts into this directory instead of printing them")
    p.add_argument("--script", choices=_script_names(), help="only this script")

    p = add(sub, "audit", common)
    p.add_argument("roles", nargs="*", metavar="ROLE")
    p.add_argument("--format", choices=("table", "json", "csv", "markdown"), default="table")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--registered",
        action="store_true",
        help="audit the AMIs in the region instead: current AMI per role, its fingerprint, drift, "
        "the paths it externalizes (from its own tags), AMIs whose role file is gone",
    )
    where.add_argument("--instance", metavar="ID", help="check a running instance live over SSH (the verify script)")
    aws_options(p)
    ssh = ssh_login_options(p, "SSH, with --instance", "the instance's host key")
    ssh.add_argument("--ssh-host", help="reach the instance at this address instead of its EC2 address")
    ssh.add_argument("--ssh-port", type=port, default=22)
    reach_options(p)

    p = add(sub, "fingerprint", common)
    p.add_argument("roles", nargs="*", metavar="ROLE")
    p.add_argument("--base-ami", help="fingerprint on this base AMI id (no cloud access)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    aws_options(p)

    p = add(sub, "changed", common)
    p.add_argument("roles", nargs="*", metavar="ROLE")
    p.add_argument("--format", choices=("names", "json", "github-matrix"), default="names")
    aws_options(p)
    for name in ("validate", "render", "audit", "fingerprint", "changed"):
        sub.choices[name].set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the command of this group that ``args`` name; return its exit code."""
    commands = {"validate": validate, "render": render, "audit": audit, "fingerprint": fingerprint}
    return commands.get(args.verb, changed)(args)


def _script_names() -> tuple[str, ...]:
    from builder.render import SCRIPTS

    return SCRIPTS


def validate(args: argparse.Namespace) -> int:
    """Validate role files; print one line per valid role."""
    require_roles(roles_dir(args))
    try:
        roles = load_roles(roles_dir(args), args.roles)
    except RoleInvalid as exc:
        if args.format != "json":
            raise
        output.emit(output.invalid(exc))
        return exc.exit_code
    output.emit(output.validated(roles, args.format))
    return ExitCode.OK


def render(args: argparse.Namespace) -> int:
    """Print the role's scripts, or write them to --out."""
    from builder.files import write_atomic
    from builder.render import render_role

    scripts = render_role(load_role(roles_dir(args), args.role))
    if args.script:
        scripts = tuple(s for s in scripts if s.name == args.script)
    if args.out:
        for script in scripts:
            path = args.out / script.name
            write_atomic(path, script.text, mode=0o755)
            output.emit(f"{path}  sha256:{script.sha256}")
    elif args.script:
        sys.stdout.write(scripts[0].text)
    else:
        for script in scripts:
            output.emit(f"# ===== {script.name} (sha256:{script.sha256}) =====")
            sys.stdout.write(script.text)
    return ExitCode.OK


def audit(args: argparse.Namespace) -> int:
    """Print which paths each role externalizes: from the role files, the AMIs, or a live instance."""
    from builder.cli import tables

    if args.instance:
        return _audit_instance(args)
    roles = load_roles(roles_dir(args), args.roles)
    if not args.registered:
        sys.stdout.write(tables.roles(roles, args.format))
        return ExitCode.OK
    from builder.registry import registered

    ec2 = connect_args(args)
    records = registered(ec2, roles)
    if args.roles:  # only the named roles (and no orphans) when roles are named
        records = [r for r in records if r.role in set(args.roles)]
    sys.stdout.write(tables.registered(records, ec2.region, args.format))
    return ExitCode.OK


def _audit_instance(args: argparse.Namespace) -> int:
    """audit --instance: run the verify script on a live instance; exit 1 when a check fails."""
    from builder.cli import tables
    from builder.live import check_instance
    from builder.reach import Reach

    if not args.identity:
        raise InvalidInput("--instance needs --identity KEY_FILE (the key the instance admits)")
    reach = Reach.of(args)
    checked = check_instance(
        connect_args(args),
        args.instance,
        roles_dir(args),
        identity=args.identity,
        known_hosts=args.known_hosts or Path.home() / ".ssh" / "known_hosts",
        user=args.ssh_user,
        port=args.ssh_port,
        reach=reach,
    )
    sys.stdout.write(tables.instance(checked, args.format))
    return ExitCode.OK if checked["passed"] else ExitCode.FAILED


def fingerprint(args: argparse.Namespace) -> int:
    """Print each role's fingerprint."""
    from builder.fingerprint import fingerprint as of
    from builder.registry import fingerprints

    roles = load_roles(roles_dir(args), args.roles)
    found = {r.name: of(r, args.base_ami) for r in roles} if args.base_ami else fingerprints(connect_args(args), roles)
    output.emit(output.fingerprints(found.values(), args.format))
    return ExitCode.OK


def changed(args: argparse.Namespace) -> int:
    """Print the roles whose fingerprint has no AMI in the region."""
    from builder.registry import changes

    roles = load_roles(roles_dir(args), args.roles)
    ec2 = connect_args(args)
    text = output.changed(changes(ec2, roles), ec2.total_calls, args.format)
    if text is not None:
        output.emit(text)
    return ExitCode.OK
