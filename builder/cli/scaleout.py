"""template: a role's launch template whose data is a snapshot, and an Auto Scaling group on it."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from builder.cli import backup_output, output
from builder.cli.context import connect_args, load_role, roles_dir
from builder.cli.options import aws_options, source_options
from builder.cli.registry import Parser, add
from builder.errors import ExitCode, InvalidInput

if TYPE_CHECKING:
    from builder.scaleout import GroupRequest


def add_parsers(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """Add the parser of template."""
    p = add(sub, "template", common)
    p.add_argument("role", metavar="ROLE")
    p.add_argument("--env", default="", help="environment name: the template is ebsrole-ROLE-ENV, its instances tagged")
    source_options(p, "take this environment's snapshots (default: --env's)")
    p.add_argument("--instance-type", help="default: the role's first instance type")
    p.add_argument("--key-name", help="EC2 key pair for your own logins")
    p.add_argument("--security-group-id", action="append", help="repeatable")
    p.add_argument(
        "--keep-volumes",
        action="store_true",
        help="keep each instance's data volume when it terminates (default: deleted; the nightly snapshot is the copy)",
    )
    p.add_argument(
        "--volume-size",
        type=int,
        metavar="GIB",
        help="data volume size (default: the snapshot's; larger: the filesystem grows at first mount)",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    asg = p.add_argument_group("Auto Scaling (docs/howto/scale-out.md)")
    asg.add_argument("--asg", metavar="NAME", help="create or update this Auto Scaling group on the template")
    asg.add_argument("--min", dest="min_size", type=int, metavar="N", help="its minimum size (needed to create it)")
    asg.add_argument("--max", dest="max_size", type=int, metavar="N", help="its maximum size (needed to create it)")
    asg.add_argument("--desired", type=int, metavar="N", help="its desired capacity")
    asg.add_argument("--subnets", metavar="SUBNET,...", help="its subnets (default when created: every AZ's default)")
    asg.add_argument("--refresh", action="store_true", help="start an instance refresh: replace its instances")
    aws_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Add a default version to the role's template; with --asg, put the group on it."""
    from builder.scaleout import Templated, TemplateRequest, existing_group, put_group, put_template

    role = load_role(roles_dir(args), args.role)
    group = _group_request(args)
    if group is not None:
        group.check()
    request = TemplateRequest(
        choice=args.source,
        source_env=args.env if args.source_env is None else args.source_env,
        allow_other_role=args.allow_other_role,
        env=args.env,
        instance_type=args.instance_type,
        key_name=args.key_name,
        security_group_ids=tuple(args.security_group_id or ()),
        keep_volumes=args.keep_volumes,
        volume_size=args.volume_size,
    )
    ec2 = connect_args(args)
    existing = existing_group(ec2, role.name, args.env, group) if group else None  # refused before any change
    version, source = put_template(ec2, role, request)
    made = put_group(ec2, role.name, args.env, version, group, existing=existing) if group else None
    done = Templated(version, source, made)
    output.emit(backup_output.templated(role.name, done, args.format))
    return ExitCode.OK


def _group_request(args: argparse.Namespace) -> GroupRequest | None:
    """Return the GroupRequest --asg names (None without it); raise InvalidInput for group options without --asg."""
    from builder.scaleout import GroupRequest

    sizes = {"--min": args.min_size, "--max": args.max_size, "--desired": args.desired, "--subnets": args.subnets}
    if args.asg is None:
        stray = [flag for flag, value in sizes.items() if value is not None] + (["--refresh"] if args.refresh else [])
        if stray:
            raise InvalidInput(f"{', '.join(stray)}: options of an Auto Scaling group; give --asg NAME")
        return None
    subnets = tuple(s.strip() for s in (args.subnets or "").split(",") if s.strip())
    return GroupRequest(args.asg, args.min_size, args.max_size, args.desired, subnets, args.refresh)
