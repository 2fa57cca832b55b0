"""snapshot, schedule, launch, drill: nightly backups, and restores from them."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from builder.cli import backup_output, output
from builder.cli.context import connect_args, load_role, require_role_files, roles_dir
from builder.cli.options import aws_options, publish_options, reach_options, source_options, ssh_login_options
from builder.cli.registry import Parser, add
from builder.errors import ExitCode, InvalidInput
from builder.reach import Reach


def add_parsers(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """Add the parsers of snapshot, schedule, launch and drill."""
    p = add(sub, "snapshot", common)
    p.add_argument("roles", nargs="*", metavar="ROLE")
    p.add_argument("--env", help="only instances of this environment (the ebsrole:env tag)")
    p.add_argument("--freeze", action="store_true", help="fsfreeze the volume over SSH around the snapshot start")
    p.add_argument(
        "--freeze-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --freeze: a watchdog on the instance thaws the volume after this long, "
        "even if the connection dies (default 60)",
    )
    p.add_argument("--keep-daily", type=int, metavar="N", help="retention: keep the N newest nightly snapshots")
    p.add_argument("--keep-weekly", type=int, default=0, metavar="M", help="and the newest of each of M weeks")
    p.add_argument("--dry-run", action="store_true", help="retention: list what it would delete, delete nothing")
    p.add_argument("--as-of", metavar="YYYY-MM-DD", help="the night to record (default: today, UTC)")
    p.add_argument(
        "--update-template",
        action="store_true",
        help="then make each role's and env's launch template (`template`) default to the night's completed snapshot",
    )
    p.add_argument(
        "--template-timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="with --update-template: how long to wait for the snapshot to complete (default 900), else skip",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    ssh_login_options(p, "SSH to existing instances (host keys pinned from known_hosts)", "the instances' host keys")
    reach_options(p)
    aws_options(p)
    publish_options(p, env=False)
    _schedule_parser(sub, common)
    for verb in ("launch", "drill"):
        _restore_parser(add(sub, verb, common), admits=verb == "drill")
    p = sub.choices["launch"]
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--env", default="", help="environment name, tagged (production, staging, ...)")
    p.add_argument("--instance-type", help="this type alone (default: the role's instance_types, tried in order)")
    p.add_argument("--key-name", help="EC2 key pair for your own logins")
    p.add_argument("--security-group-id", action="append", help="repeatable")
    p.add_argument("--wait", action="store_true", help="wait until each instance passes the verify script over SSH")
    for name in ("snapshot", "schedule", "launch", "drill"):
        sub.choices[name].set_defaults(run=run)


def _restore_parser(p: Parser, *, admits: bool) -> None:
    """The options launch and drill share: which snapshot, which AZ, how to log in (``admits``: drill's group)."""
    p.add_argument("role", metavar="ROLE")
    source_options(p, "restore this environment's data (launch: default its --env; drill: default no environment)")
    p.add_argument("--az", help="availability zone (drill: default one other than the snapshot's)")
    p.add_argument("--subnet-id", help="launch in this subnet (its AZ; drill: a subnet in another AZ than the data's)")
    p.add_argument(
        "--volume-size",
        type=int,
        metavar="GIB",
        help="data volume size (default: the snapshot's; larger: the filesystem grows at first mount)",
    )
    p.add_argument("--ssh-user", default="admin")
    p.add_argument("--format", choices=("table", "json"), default="table")
    reach_options(p, launches=True, admits=admits)
    aws_options(p)


def _schedule_parser(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    p = add(sub, "schedule", common)
    p.add_argument("role", metavar="ROLE")
    p.add_argument("--env", default="", help="the environment whose data volumes it snapshots (launch --env)")
    p.add_argument("--time", default="03:00", help="daily snapshot time, HH:MM UTC (default 03:00)")
    p.add_argument("--keep-daily", type=int, default=7)
    p.add_argument("--keep-weekly", type=int, default=4)
    p.add_argument("--copy-to", metavar="REGION", help="also copy each snapshot to this region")
    p.add_argument("--execution-role-arn", help="the IAM role DLM uses (default: the account's DLM default role)")
    p.add_argument(
        "--apply", action="store_true", help="create the policy, or update the role's and env's existing one"
    )
    aws_options(p)


def run(args: argparse.Namespace) -> int:
    """Run the command of this group that ``args`` name; return its exit code."""
    return {"snapshot": snapshot, "schedule": schedule, "launch": launch}.get(args.verb, drill)(args)


def _night(as_of: str | None) -> dt.date:
    """Return the night --as-of names (default today, UTC); raises InvalidInput for a bad or future one."""
    today = dt.datetime.now(dt.UTC).date()
    try:
        date = dt.date.fromisoformat(as_of) if as_of else today
    except ValueError:
        raise InvalidInput(f"--as-of {as_of!r}: give a date as YYYY-MM-DD") from None
    if date > today:
        raise InvalidInput(f"--as-of {as_of}: a night in the future (today is {today.isoformat()}, UTC)")
    return date


def _check_snapshot_options(args: argparse.Namespace) -> None:
    if args.keep_daily is not None and args.keep_daily < 1:
        raise InvalidInput(f"--keep-daily {args.keep_daily}: keep at least 1")
    if args.keep_weekly < 0:
        raise InvalidInput(f"--keep-weekly {args.keep_weekly}: at least 0")
    if (args.freeze or args.known_hosts) and not args.identity:
        raise InvalidInput("--freeze needs SSH to the instances: give --identity KEY_FILE")
    if not 0 < args.template_timeout <= 86400:
        raise InvalidInput(f"--template-timeout {args.template_timeout:g}: give more than 0 and at most 86400 seconds")
    if not 1 <= args.freeze_timeout <= 900:
        raise InvalidInput(f"--freeze-timeout {args.freeze_timeout:g}: give 1 to 900 seconds")


def snapshot(args: argparse.Namespace) -> int:
    """Snapshot the data volumes of running role instances; apply retention."""
    from builder.backups import apply_retention, publish_latest, role_instances, snapshot_instances, ssh_connector

    date = _night(args.as_of)
    _check_snapshot_options(args)
    Reach.of(args)  # checked before any cloud call
    require_role_files(roles_dir(args), args.roles)
    ec2 = connect_args(args)
    instances = role_instances(ec2, args.roles or None, args.env)
    known_hosts = args.known_hosts or Path.home() / ".ssh/known_hosts"
    login = ssh_connector(args.identity, known_hosts, args.ssh_user, Reach.of(args)) if args.identity else None
    results = snapshot_instances(
        ec2, instances, date, freeze=args.freeze, connect=login, freeze_timeout=args.freeze_timeout
    )
    failed = any(r.result == "failed" for r in results)
    if failed:  # a failed night deletes nothing: its older snapshots are all there is
        output.note(backup_output.snapshot_failures(results))
    retention = []
    if args.keep_daily is not None and not failed:
        volumes = [i.volume_id for i in instances]
        retention = apply_retention(ec2, volumes, args.keep_daily, args.keep_weekly, dry_run=args.dry_run)
    latest = publish_latest(ec2, instances) if args.publish else []
    templates = None
    if args.update_template:
        from builder.scaleout import update_templates

        templates = update_templates(ec2, instances, results, args.template_timeout)
    output.emit(
        backup_output.snapshots(date.isoformat(), results, retention, args.format, latest=latest, templates=templates)
    )
    rows = [{"name": p.parameter, "value": p.snapshot_id, "outcome": p.outcome, "error": p.error} for p in latest]
    warning = output.unpublished([(ec2.region, rows)])
    if warning:  # the snapshots stand; the exit code says only whether they were taken
        output.note(warning)
    skipped = any(t.result == "skipped" for t in templates or ())
    return ExitCode.FAILED if failed or skipped or any(r.fate == "left" for r in retention) else ExitCode.OK


def schedule(args: argparse.Namespace) -> int:
    """Print or create the role's DLM policy."""
    from builder.schedule import schedule as role_schedule

    load_role(roles_dir(args), args.role)  # the role must exist
    if args.apply and args.sandbox:
        raise InvalidInput("the sandbox has no Data Lifecycle Manager: print the policy without --apply")
    done = role_schedule(
        args.role,
        lambda: connect_args(args),
        apply=args.apply,
        execution_role_arn=args.execution_role_arn,
        env=args.env,
        time=args.time,
        keep_daily=args.keep_daily,
        keep_weekly=args.keep_weekly,
        copy_to=args.copy_to,
    )
    output.emit(f"{args.role}: DLM policy {done.policy_id} {done.done}" if args.apply else output.as_json(done.policy))
    return ExitCode.OK


def _volume_size(args: argparse.Namespace) -> int | None:
    """Return --volume-size (None: the snapshot's); refuse one below 1 GiB before any cloud call."""
    if args.volume_size is not None and args.volume_size < 1:
        raise InvalidInput(f"--volume-size {args.volume_size}: give a size in GiB, at least 1")
    return int(args.volume_size) if args.volume_size is not None else None


def launch(args: argparse.Namespace) -> int:
    """Launch instances of a role from a snapshot; with --wait, verify each over SSH."""
    from builder.launch import LaunchRequest, restore

    role = load_role(roles_dir(args), args.role)
    if args.count < 1:
        raise InvalidInput(f"--count {args.count}: at least 1")
    request = LaunchRequest(
        choice=args.source,
        source_env=args.env if args.source_env is None else args.source_env,  # production restores production's
        allow_other_role=args.allow_other_role,
        count=args.count,
        az=args.az,
        env=args.env,
        instance_type=args.instance_type,
        key_name=args.key_name,
        subnet_id=args.subnet_id,
        security_group_ids=tuple(args.security_group_id or ()),
        wait=args.wait,
        ssh_user=args.ssh_user,
        reach=Reach.of(args),
        public_ip=False if args.no_public_ip else None,
        volume_size=_volume_size(args),
    )
    done = restore(connect_args(args), role, request)
    output.emit(backup_output.launched(role.name, done.image.image_id, done.source, done.instances, args.format))
    return ExitCode.FAILED if any(i.verified is False for i in done.instances) else ExitCode.OK


def drill(args: argparse.Namespace) -> int:
    """Run a restore drill; exit 0 when it passed."""
    from builder.drill import DrillRequest, run

    role = load_role(roles_dir(args), args.role)
    request = DrillRequest(
        choice=args.source,
        source_env=args.source_env or "",
        allow_other_role=args.allow_other_role,
        az=args.az,
        ssh_cidr=args.ssh_cidr,
        ssh_source_group=args.ssh_source_group,
        user=args.ssh_user,
        reach=Reach.of(args),
        public_ip=False if args.no_public_ip else None,
        subnet_id=args.subnet_id,
        volume_size=_volume_size(args),
    )
    done = run(connect_args(args), role, request)
    output.emit(backup_output.drilled(role.name, done.source, done.report, args.format))
    if done.report.left_behind:
        return ExitCode.LEFTOVERS
    return ExitCode.OK if done.report.passed else ExitCode.FAILED
