"""prune, copy, share, sweep: the AMIs, snapshots and leftovers the tool made in a region."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from builder.cli import output
from builder.cli.context import Target, connect, connect_args
from builder.cli.options import aws_options, publish_options
from builder.cli.registry import Parser, add
from builder.errors import ExitCode, InvalidInput


def add_parsers(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """Add the parsers of prune, copy and sweep."""
    p = add(sub, "prune", common)
    p.add_argument("role", metavar="ROLE")
    p.add_argument("--keep", type=int, required=True, help="how many of the newest AMIs to keep (at least 1)")
    p.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    p.add_argument(
        "--include-shared", action="store_true", help="also deregister AMIs shared with other accounts or public"
    )
    p.add_argument(
        "--skip-ssm-check",
        action="store_true",
        help="do not read SSM parameters (/ebsrole/..., resolve:ssm: in launch templates): "
        "AMIs only they name may be deregistered",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    aws_options(p)

    p = add(sub, "copy", common)
    p.add_argument("role", metavar="ROLE")
    p.add_argument("--to", required=True, action="append", metavar="REGION", help="repeatable")
    p.add_argument("--ami", help="this AMI of the role instead of the current one")
    p.add_argument(
        "--kms-key-id",
        action="append",
        default=[],
        metavar="REGION=KEY",
        help="encrypt the copy in REGION with this customer-managed key (repeatable; else the role's copy_kms_key_ids)",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    aws_options(p)
    publish_options(p, env=True)
    _share_parser(add(sub, "share", common))
    _sweep_parser(add(sub, "sweep", common))
    for name in ("prune", "copy", "share", "sweep"):
        sub.choices[name].set_defaults(run=run)


def _share_parser(p: Parser) -> None:
    p.add_argument("role", metavar="ROLE")
    whom = p.add_mutually_exclusive_group(required=True)
    whom.add_argument("--accounts", metavar="ID,ID", help="12-digit account ids, comma-separated")
    whom.add_argument("--org-arn", metavar="ARN", help="an organization (launch permission only)")
    whom.add_argument("--ou-arn", metavar="ARN", help="an organizational unit (launch permission only)")
    p.add_argument("--ami", help="this AMI of the role instead of the current one")
    p.add_argument("--revoke", action="store_true", help="remove the permissions instead")
    p.add_argument("--format", choices=("text", "json"), default="text")
    aws_options(p)


def _sweep_parser(p: Parser) -> None:
    p.add_argument(
        "--older-than",
        help="only what is older than this (e.g. 3h, 1d); at least twice the build time limit "
        "(default and floor: 2h) unless --force",
    )
    p.add_argument(
        "--build-time-limit",
        type=float,
        default=3600,
        metavar="S",
        help="the build --timeout your builds use (default 3600): the floor of --older-than is twice it",
    )
    p.add_argument("--force", action="store_true", help="allow --older-than below the floor")
    p.add_argument("--build-id", metavar="ID", help="only this build's leftovers, whatever their age")
    p.add_argument(
        "--volumes",
        action="store_true",
        help="list the tool's available volumes (left by launch, drills, terminated instances) instead",
    )
    p.add_argument("--delete", action="store_true", help="with --volumes: delete the volumes listed")
    p.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    p.add_argument("--format", choices=("table", "json"), default="table")
    aws_options(p)


def run(args: argparse.Namespace) -> int:
    """Run the command of this group that ``args`` name; return its exit code."""
    return {"prune": prune, "copy": copy, "share": share}.get(args.verb, sweep)(args)


def _check_role_name(verb: str, role: str, what: str) -> None:
    from builder.roles import ROLE_NAME

    if not ROLE_NAME.match(role):
        raise InvalidInput(f"{verb} {role!r}: not a role name{what}")


def prune(args: argparse.Namespace) -> int:
    """Deregister older AMIs of a role and delete their snapshots."""
    from builder.registry import prune as prune_role

    _check_role_name("prune", args.role, " (lower-case letters, digits, -)")
    if args.keep < 1:
        raise InvalidInput(f"--keep {args.keep}: keep at least the newest AMI (1)")
    rows = prune_role(
        connect_args(args),
        args.role,
        args.keep,
        dry_run=args.dry_run,
        include_shared=args.include_shared,
        check_ssm=not args.skip_ssm_check,
    )
    output.emit(output.pruned(args.role, rows, args.dry_run, args.format))
    return ExitCode.OK


def copy(args: argparse.Namespace) -> int:
    """Copy the role's AMI to other regions."""
    from builder.copy import copy_to_regions
    from builder.publish import check_env

    _check_role_name("copy", args.role, "")
    check_env(args.publish_env, "--env")
    keys = _copy_keys(args)
    target = Target.of(args)
    ec2 = connect(target)
    made = copy_to_regions(
        ec2,
        lambda region: connect(target, region),
        args.role,
        args.ami,
        args.to,
        keys=keys,
        publish_to=args.publish,
        env=args.publish_env,
    )
    output.emit(output.copied(args.role, [asdict(c) for c in made], args.format))
    warning = output.unpublished([(c.region, c.published) for c in made])
    if warning:  # the copies stand: exit 0
        output.note(warning)
    return ExitCode.OK


def _copy_keys(args: argparse.Namespace) -> dict[str, str]:
    """Return the copies' keys by region: the role file's copy_kms_key_ids (when there is one), then --kms-key-id."""
    from builder.cli.context import load_role, roles_dir
    from builder.pipeline import KMS_KEY
    from builder.roles import role_names

    where = roles_dir(args)
    keys = dict(load_role(where, args.role).copy_kms_key_ids) if args.role in role_names(where) else {}
    for given in args.kms_key_id:
        region, _, key = given.partition("=")
        if not region or not KMS_KEY.fullmatch(key):
            raise InvalidInput(f"--kms-key-id {given!r}: give REGION=KEY (a key id, key ARN, alias/NAME or alias ARN)")
        keys[region] = key
    return {r: k for r, k in keys.items() if r in args.to or any(g.startswith(f"{r}=") for g in args.kms_key_id)}


def share(args: argparse.Namespace) -> int:
    """Grant (or revoke) other accounts the role's AMI and its snapshots."""
    from builder import accounts

    _check_role_name("share", args.role, "")
    if args.org_arn:
        accounts.check_org_arn(args.org_arn)
    if args.ou_arn:
        accounts.check_ou_arn(args.ou_arn)
    ids = accounts.parse_accounts(args.accounts) if args.accounts else ()
    grantees = accounts.Grantees(ids, args.org_arn, args.ou_arn)
    done = accounts.share(connect_args(args), args.role, args.ami, grantees, revoke=args.revoke)
    output.emit(output.shared(done, args.format))
    return ExitCode.OK


def sweep(args: argparse.Namespace) -> int:
    """List (and unless --dry-run remove) leftovers of builds; with --volumes, the tool's available volumes."""
    from builder import sweep as leftovers

    if args.volumes:
        return _sweep_volumes(args)
    if args.delete:
        raise InvalidInput("--delete goes with --volumes (leftovers of builds are removed unless --dry-run)")
    if args.build_id:
        leftovers.check_build_id(args.build_id)
        older_than = leftovers.parse_age(args.older_than) if args.older_than else 0.0
    else:
        floor = leftovers.age_floor(args.build_time_limit)
        text = args.older_than or leftovers.duration(floor)
        older_than = leftovers.parse_age(text)
        leftovers.check_older_than(older_than, text, floor, force=args.force)
    ec2 = connect_args(args)
    surveyed = leftovers.survey(ec2, older_than, build_id=args.build_id)
    found = [f for f in surveyed if f.fate == "found"]
    spared = [f for f in surveyed if f.fate == "spared"]
    if not args.dry_run:
        leftovers.remove(ec2, found)
    output.emit(output.swept(found, spared, args.dry_run, args.format))
    if args.format != "json" and spared:
        output.note(output.spared_notes(spared))
    return ExitCode.LEFTOVERS if any(f.fate == "left" for f in found) else ExitCode.OK


def _sweep_volumes(args: argparse.Namespace) -> int:
    """sweep --volumes: list the tool's available volumes; delete them only with --delete."""
    from builder import sweep as leftovers

    if args.build_id or args.older_than:
        raise InvalidInput("--volumes takes neither --build-id nor --older-than: it lists every available volume")
    ec2 = connect_args(args)
    volumes = leftovers.find_volumes(ec2)
    delete = args.delete and not args.dry_run
    if delete:
        leftovers.remove(ec2, volumes)
    output.emit(output.volumes(volumes, delete, args.format))
    return ExitCode.LEFTOVERS if any(v.fate == "left" for v in volumes) else ExitCode.OK
