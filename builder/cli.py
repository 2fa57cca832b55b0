"""The command line: parse arguments, set up logging, run a command, map errors to exit codes.

This is the only module that prints to the terminal on its own account, reads argv
or decides the process's exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from builder import __version__
from builder.errors import BuildError, ExitCode, InvalidInput, RoleInvalid, RoleNotFound, Terminated, exit_code_help

if TYPE_CHECKING:
    from builder.ec2 import EC2

log = logging.getLogger("builder")

VERBS = (
    "validate",
    "render",
    "audit",
    "sweep",
    "sandbox",
    "fingerprint",
    "changed",
    "prune",
    "snapshot",
    "schedule",
    "launch",
    "drill",
    "copy",
)
VALUELESS_GLOBALS = ("--debug", "--verbose", "-v")

EPILOG = exit_code_help()


BUILD_USAGE = """build.py ROLE [ROLE...] | --all [options]
       build.py COMMAND ... (see the commands below, and build.py COMMAND --help)"""
BUILD_DESCRIPTION = """\
Build the role AMI of each ROLE, paired with the seed snapshot of its data volume.

commands:
  validate   check role files; every problem at once
  render     print or write a role's scripts (no cloud access)
  audit      which paths each role puts on its volume (--registered: its AMIs; --instance: live)
  fingerprint  the hash of everything that decides what a role's build produces
  changed    the roles whose fingerprint has no AMI yet (what CI must build)
  prune      deregister a role's older AMIs and delete their snapshots
  snapshot   nightly snapshots of the role instances' data volumes, with retention
  schedule   the same policy as an Amazon Data Lifecycle Manager policy
  launch     instances of a role, the data volume restored from a snapshot, in any AZ
  drill      a restore drill: restore into another AZ, check it, remove it, report
  copy       copy a role AMI and its snapshots to another region, pairing kept
  sweep      remove what killed builds left behind (found by tag)
  sandbox    start|status|stop|reset|env the local sandbox (EC2 endpoint + real machines)

--sandbox on any command that talks to EC2 runs it against the local sandbox, started
when needed: no AWS account, same code path.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default sys.argv[1:]) and return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    # Ctrl-C must always reach the cleanup: a shell that starts this in the background
    # hands it SIGINT ignored, and Python then never raises KeyboardInterrupt.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            args = _parse(args_list)
        except SystemExit as exc:
            # argparse exits after --help/--version (0) or a usage error it printed (2).
            return int(exc.code or 0)
        _configure_logging(args.debug, args.verbose)
        result: int = args.run(args)
        return result
    except RoleInvalid as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except BuildError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Terminated:
        print("terminated", file=sys.stderr)
        return ExitCode.TERMINATED
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no bare tracebacks
        if debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return ExitCode.FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated


def _configure_logging(debug: bool, verbose: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s" if debug else "%(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    from builder.redact import RedactSecrets

    for handler in logging.getLogger().handlers:  # --debug logs botocore's bodies: user-data holds a key
        handler.addFilter(RedactSecrets())
    if not debug:
        # Third-party chatter (botocore, paramiko) only under --debug.
        for noisy in ("botocore", "boto3", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # paramiko logs every refused connection while a machine boots as an ERROR;
        # remote.py retries those and reports what matters itself.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("builder.remote.output").setLevel(logging.INFO if verbose or debug else logging.WARNING)


# ---------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are exit code 2 with one clear line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.INVALID_INPUT)


def _port(text: str) -> int:
    """Return ``text`` as a TCP port; argparse reports a bad one as a usage error (exit 2)."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 1 to 65535")
    return port


def _seconds(text: str) -> float:
    """Return ``text`` as a time limit in s: more than 0 and at most 7 days (the dead-man switch)."""
    from builder.pipeline import MAX_TIMEOUT

    try:
        seconds = float(text)
    except ValueError:
        seconds = 0
    if not 0 < seconds <= MAX_TIMEOUT:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, more than 0 and at most {MAX_TIMEOUT} (7 days)")
    return seconds


def _common() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--roles-dir", type=Path, default=None, help="directory of role files (default: roles/ of this project)"
    )
    common.add_argument("--debug", action="store_true", help="debug logging, and tracebacks on errors")
    common.add_argument("-v", "--verbose", action="store_true", help="stream remote script output")
    return common


def _parse(argv: list[str]) -> argparse.Namespace:
    first = next((a for a in argv if a not in VALUELESS_GLOBALS), None)
    parser = _verb_parser() if first in VERBS else _build_parser()
    return parser.parse_args(argv)


def _verb_parser() -> _Parser:
    common = _common()
    parser = _Parser(
        prog="build.py",
        description="ebsrole: role AMIs whose dynamic data lives on EBS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "validate",
        parents=[common],
        help="check role files; every problem at once",
        description="Check role files (all by default) and report every problem at once.",
    )
    p.add_argument("roles", nargs="*", metavar="ROLE")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(run=cmd_validate)

    p = sub.add_parser(
        "render",
        parents=[common],
        help="print or write a role's scripts (no cloud access)",
        description="Render a role's provisioning scripts: print them, or write them to --out DIR.",
    )
    p.add_argument("role", metavar="ROLE")
    p.add_argument("--out", type=Path, help="write the scripts into this directory instead of printing them")
    p.add_argument("--script", choices=_script_names(), help="only this script")
    p.set_defaults(run=cmd_render)

    p = sub.add_parser(
        "audit",
        parents=[common],
        help="which paths each role puts on its volume",
        description="List the paths each role externalizes, with mount point, device and volume.",
    )
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
    _aws_options(p)
    ssh = p.add_argument_group("SSH, with --instance")
    ssh.add_argument("--identity", type=Path, help="private key file to log in with")
    ssh.add_argument(
        "--known-hosts", type=Path, help="known_hosts holding the instance's host key (default ~/.ssh/known_hosts)"
    )
    ssh.add_argument("--ssh-user", default="admin", help="login user (default admin)")
    ssh.add_argument("--ssh-host", help="reach the instance at this address instead of its EC2 address")
    ssh.add_argument("--ssh-port", type=_port, default=22)
    p.set_defaults(run=cmd_audit)

    _registry_parsers(sub, common)
    _backup_parsers(sub, common)

    p = sub.add_parser(
        "sweep",
        parents=[common],
        help="remove what killed builds left behind",
        description="Find resources this tool made that belong to no finished build (temporary ones, "
        "AMIs and snapshots never completed) and remove them. Only resources whose tags (created-by "
        "ebsrole, a build id, a readable created-at) and naming (the build's key pair and security "
        "group) agree; one without a readable created-at is never old. With --volumes instead: the "
        "tool's available (unattached) volumes, listed unless --delete.",
    )
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
    _aws_options(p)
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser(
        "sandbox",
        parents=[common],
        help="the local sandbox: an EC2 endpoint with real machines behind it",
        description="Run the local sandbox in the background (state kept on disk until reset): "
        "an EC2 endpoint on 127.0.0.1 whose instances are local Debian machines and whose "
        "volumes and snapshots are files.",
    )
    p.add_argument(
        "action",
        choices=("start", "status", "stop", "reset", "env"),
        help="env: print the exports that point awscli, Terraform and Packer at it (its endpoint and credentials)",
    )
    p.add_argument(
        "--release",
        action="append",
        choices=("bookworm", "trixie"),
        help="prepare this Debian tree at start (repeatable; default bookworm)",
    )
    p.add_argument(
        "--latency",
        choices=("none", "realistic"),
        default="none",
        help="start: model EC2's waiting (transitional states that last; default none: instant)",
    )
    p.add_argument("--latency-scale", type=float, default=1.0, help="start: multiply the model's times (e.g. 0.1)")
    p.add_argument("--api-rate", type=float, default=0, help="start: throttle EC2 calls to this many a second")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(run=cmd_sandbox)
    return parser


def _registry_parsers(sub: Any, common: _Parser) -> None:
    """fingerprint, changed, prune: questions about what is registered in the region."""
    p = sub.add_parser(
        "fingerprint",
        parents=[common],
        help="the hash of everything that decides what a role's build produces",
        description="Print each role's fingerprint: a hash of the role after defaults, the templates, "
        "the rendered scripts, the resolved base AMI and the tool version. The base AMI is looked "
        "up in the region unless --base-ami gives it.",
    )
    p.add_argument("roles", nargs="*", metavar="ROLE")
    p.add_argument("--base-ami", help="fingerprint on this base AMI id (no cloud access)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    _aws_options(p)
    p.set_defaults(run=cmd_fingerprint)

    p = sub.add_parser(
        "changed",
        parents=[common],
        help="the roles whose fingerprint has no AMI yet",
        description="List the roles (all by default) whose current fingerprint has no available AMI "
        "in the region: what CI must build. A fixed number of EC2 calls, however many roles.",
    )
    p.add_argument("roles", nargs="*", metavar="ROLE")
    p.add_argument("--format", choices=("names", "json", "github-matrix"), default="names")
    _aws_options(p)
    p.set_defaults(run=cmd_changed)

    p = sub.add_parser(
        "prune",
        parents=[common],
        help="deregister a role's older AMIs and delete their snapshots",
        description="Deregister the role's AMIs but the newest --keep, and delete their snapshots. "
        "Never one that an instance not yet terminated was launched from, that any launch template "
        "version names (also through resolve:ssm:), that an SSM parameter under /ebsrole/ holds, or "
        "that is shared with other accounts or public; never a snapshot another kept AMI uses. Each "
        "spared AMI is listed with its reason. When SSM cannot be read, nothing is deleted (exit 3).",
    )
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
    _aws_options(p)
    p.set_defaults(run=cmd_prune)


def _backup_parsers(sub: Any, common: _Parser) -> None:
    """snapshot, schedule, launch, drill, copy: backups and restores."""
    p = sub.add_parser(
        "snapshot",
        parents=[common],
        help="nightly snapshots of the role instances' data volumes",
        description="Snapshot the data volume of every running instance of the roles (all when none are "
        "named), one per volume and date; then apply the retention policy if given. Meant for cron.",
    )
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
    p.add_argument("--format", choices=("table", "json"), default="table")
    _ssh_login_options(p)
    _aws_options(p)
    p.set_defaults(run=cmd_snapshot)

    _schedule_parser(sub, common)

    for verb, helptext in (
        ("launch", "instances of a role with the data volume restored from a snapshot"),
        ("drill", "a restore drill: restore into another AZ, check over SSH, remove, report"),
    ):
        p = sub.add_parser(verb, parents=[common], help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        p.add_argument("role", metavar="ROLE")
        p.add_argument(
            "--from",
            dest="source",
            default="latest",
            help="latest (the newest nightly snapshot; default), seed, or a snapshot id",
        )
        p.add_argument(
            "--source-env",
            help="restore this environment's data (launch: default its --env; drill: default no environment)",
        )
        p.add_argument(
            "--allow-other-role",
            action="store_true",
            help="with --from SNAP: accept a snapshot of another role (never another account's or kind's)",
        )
        p.add_argument("--az", help="availability zone (drill: default one other than the snapshot's)")
        p.add_argument("--ssh-user", default="admin")
        p.add_argument("--format", choices=("table", "json"), default="table")
        _aws_options(p)
    p.add_argument("--ssh-cidr", help="admit SSH only from this CIDR (default: this machine's address)")
    p.set_defaults(run=cmd_drill)
    p = sub.choices["launch"]
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--env", default="", help="environment name, tagged (production, staging, ...)")
    p.add_argument("--instance-type", help="default: the role's instance_type")
    p.add_argument("--key-name", help="EC2 key pair for your own logins")
    p.add_argument("--subnet-id")
    p.add_argument("--security-group-id", action="append", help="repeatable")
    p.add_argument("--wait", action="store_true", help="wait until each instance passes the verify script over SSH")
    p.set_defaults(run=cmd_launch)

    p = sub.add_parser(
        "copy",
        parents=[common],
        help="copy a role AMI and its snapshots to another region",
        description="Copy the role's current AMI (or --ami) with its snapshots to another region; tags and "
        "the AMI/seed-snapshot pairing are kept.",
    )
    p.add_argument("role", metavar="ROLE")
    p.add_argument("--to", required=True, action="append", metavar="REGION", help="repeatable")
    p.add_argument("--ami", help="this AMI of the role instead of the current one")
    p.add_argument("--format", choices=("text", "json"), default="text")
    _aws_options(p)
    p.set_defaults(run=cmd_copy)


def _schedule_parser(sub: Any, common: _Parser) -> None:
    """schedule: the DLM policy."""
    p = sub.add_parser(
        "schedule",
        parents=[common],
        help="the snapshot policy as an Amazon Data Lifecycle Manager policy",
        description="Print (or with --apply create) a DLM policy that snapshots the role's data volumes "
        "daily and weekly, with the tool's tags, optionally copying to another region.",
    )
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
    _aws_options(p)
    p.set_defaults(run=cmd_schedule)


def _ssh_login_options(p: argparse.ArgumentParser) -> None:
    ssh = p.add_argument_group("SSH to existing instances (host keys pinned from known_hosts)")
    ssh.add_argument("--identity", type=Path, help="private key file to log in with")
    ssh.add_argument(
        "--known-hosts", type=Path, help="known_hosts holding the instances' host keys (default ~/.ssh/known_hosts)"
    )
    ssh.add_argument("--ssh-user", default="admin", help="login user (default admin)")


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="build.py",
        parents=[_common()],
        usage=BUILD_USAGE,
        description=BUILD_DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("roles", nargs="*", metavar="ROLE", help="role names (files roles/ROLE.yaml)")
    parser.add_argument("--all", action="store_true", help="every role of the roles directory")
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="with several roles: build N at a time (default 1)"
    )
    parser.add_argument(
        "--if-changed",
        action="store_true",
        help="skip a role whose fingerprint already has an AMI; print that AMI instead",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="the result lines (or summary)")
    parser.add_argument("--version", action="version", version=f"ebsrole {__version__}")
    _aws_options(parser)
    ssh = parser.add_argument_group("the builder")
    ssh.add_argument("--ssh-user", default="admin", help="login user of the base AMI (default admin)")
    ssh.add_argument("--ssh-host", help="reach the builder at this address instead of its EC2 address")
    ssh.add_argument("--ssh-port", type=_port, default=22, help="and this port (default 22)")
    ssh.add_argument("--ssh-cidr", help="admit SSH only from this CIDR (default: this machine's address, /32)")
    ssh.add_argument("--subnet-id", help="launch the builder in this subnet (default: the default VPC)")
    ssh.add_argument("--security-group-id", help="use this security group instead of making one")
    ssh.add_argument(
        "--timeout", type=_seconds, default=3600, help="build time limit in s; the builder powers off after it"
    )
    ssh.add_argument("--ssh-timeout", type=_seconds, default=600, help="how long to wait for SSH (s)")
    out = parser.add_argument_group("results")
    out.add_argument(
        "--manifest", type=Path, help="write the manifest here (one role only; default manifests/ROLE-BUILD.json)"
    )
    out.add_argument(
        "--keep-on-failure", action="store_true", help="keep the builder when the build fails, to debug it"
    )
    out.add_argument(
        "--copy-to", action="append", metavar="REGION", help="then copy the AMI and its snapshots there (repeatable)"
    )
    parser.set_defaults(run=cmd_build)
    return parser


def _aws_options(parser: argparse.ArgumentParser) -> None:
    aws = parser.add_argument_group("AWS")
    aws.add_argument(
        "--region",
        default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        help="AWS region (default: AWS_REGION, then the profile's)",
    )
    aws.add_argument("--profile", help="named profile from ~/.aws/config (default: the standard credential chain)")
    aws.add_argument("--endpoint-url", help="any EC2-compatible endpoint instead of AWS's")
    aws.add_argument(
        "--sandbox", action="store_true", help="use the local sandbox (started when needed) instead of AWS"
    )


def _script_names() -> tuple[str, ...]:
    from builder.render import SCRIPTS

    return SCRIPTS


def _roles_dir(args: argparse.Namespace) -> Path:
    from builder.roles import ROLES_DIR

    return Path(args.roles_dir) if args.roles_dir else ROLES_DIR


# ---------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate role files; print one line per valid role."""
    from builder.roles import load_roles

    _require_roles(args)
    try:
        roles = load_roles(args.roles, _roles_dir(args))
    except RoleInvalid as exc:
        if args.format == "json":
            problems = [{"file": p.file, "key": p.key, "message": p.message} for p in exc.problems]
            _print(json.dumps({"valid": False, "problems": problems}, indent=2))
            return exc.exit_code
        raise
    if args.format == "json":
        _print(json.dumps({"valid": True, "roles": [r.name for r in roles], "problems": []}, indent=2))
    else:
        for role in roles:
            _print(f"ok  {role.file}")
    return ExitCode.OK


def cmd_render(args: argparse.Namespace) -> int:
    """Print the role's scripts, or write them to --out."""
    from builder.files import write_atomic
    from builder.render import render_role
    from builder.roles import load_role

    scripts = render_role(load_role(args.role, _roles_dir(args)))
    if args.script:
        scripts = tuple(s for s in scripts if s.name == args.script)
    if args.out:
        for script in scripts:
            path = args.out / script.name
            write_atomic(path, script.text, mode=0o755)
            _print(f"{path}  sha256:{script.sha256}")
        return ExitCode.OK
    if args.script:
        sys.stdout.write(scripts[0].text)
        return ExitCode.OK
    for script in scripts:
        _print(f"# ===== {script.name} (sha256:{script.sha256}) =====")
        sys.stdout.write(script.text)
    return ExitCode.OK


def cmd_audit(args: argparse.Namespace) -> int:
    """Print which paths each role externalizes: from the role files, the AMIs, or a live instance."""
    from builder import audit
    from builder.roles import load_roles

    if args.instance:
        from builder.live import check_instance

        if not args.identity:
            raise InvalidInput("--instance needs --identity KEY_FILE (the key the instance admits)")
        report = check_instance(
            _connect(args),
            args.instance,
            _roles_dir(args),
            identity=args.identity,
            known_hosts=args.known_hosts or Path.home() / ".ssh" / "known_hosts",
            user=args.ssh_user,
            host=args.ssh_host,
            port=args.ssh_port,
        )
        sys.stdout.write(audit.format_instance(report, args.format))
        return ExitCode.OK if report["passed"] else ExitCode.FAILED
    if args.registered:
        from builder.registry import registered

        roles = load_roles(args.roles, _roles_dir(args))
        ec2 = _connect(args)
        records = registered(ec2, roles)
        if args.roles:  # only the named roles (and no orphans) when roles are named
            records = [r for r in records if r.role in set(args.roles)]
        sys.stdout.write(audit.format_registered(records, ec2.region, args.format))
        return ExitCode.OK
    sys.stdout.write(audit.format_audit(load_roles(args.roles, _roles_dir(args)), args.format))
    return ExitCode.OK


def cmd_build(args: argparse.Namespace) -> int:
    """Build the role AMIs: one in this process, several as one process each (--jobs at a time)."""
    from builder.pipeline import BuildOptions, build, ssh_cidr
    from builder.roles import load_roles

    if args.all == bool(args.roles):
        raise InvalidInput("name the roles to build, or give --all (not both)")
    if args.jobs < 1:
        raise InvalidInput(f"--jobs {args.jobs}: must be at least 1")
    _require_roles(args)
    roles = load_roles(None if args.all else args.roles, _roles_dir(args))
    if args.manifest and len(roles) > 1:
        raise InvalidInput("--manifest names one file: give it with one role only")
    _check_writable_dir(args.manifest.parent if args.manifest else Path("manifests"), f"--manifest {args.manifest}")
    if len(roles) > 1:
        return _build_many(args, [r.name for r in roles])
    ec2 = _connect(args)
    # Settled before anything is created: a CIDR that cannot be found stops the build here.
    cidr = None if args.security_group_id else ssh_cidr(args.ssh_cidr, args.endpoint_url)
    options = BuildOptions(
        ssh_user=args.ssh_user,
        ssh_host=args.ssh_host,
        ssh_port=args.ssh_port,
        ssh_cidr=cidr,
        endpoint_url=args.endpoint_url,
        subnet_id=args.subnet_id,
        security_group_id=args.security_group_id,
        keep_on_failure=args.keep_on_failure,
        timeout=args.timeout,
        ssh_timeout=args.ssh_timeout,
        manifest_path=args.manifest,
        if_changed=args.if_changed,
    )
    manifest = build(roles[0], ec2, options)
    copies = _copy_to(args, ec2, roles[0].name, manifest.ami) if args.copy_to else []
    if args.format == "json":
        record = {
            "role": manifest.role,
            "result": manifest.status,
            "ami": manifest.ami,
            "seed_snapshot": manifest.seed_snapshot,
            "fingerprint": manifest.fingerprint,
            "manifest": str(manifest.path),
            "copies": copies,
        }
        _print(json.dumps({"builds": [record]}, indent=2))
    elif manifest.status == "unchanged":
        _print(
            f"{manifest.role}: unchanged: AMI {manifest.ami} seed snapshot {manifest.seed_snapshot} "
            f"(fingerprint {manifest.fingerprint})"
        )
    else:
        _print(f"{manifest.role}: AMI {manifest.ami} seed snapshot {manifest.seed_snapshot} (manifest {manifest.path})")
    if args.format != "json":
        for copy in copies:
            _print(
                f"{manifest.role}: copied to {copy['region']}: AMI {copy['ami']} seed snapshot {copy['seed_snapshot']}"
            )
    return ExitCode.OK


def _copy_to(args: argparse.Namespace, ec2: EC2, role: str, ami: str | None) -> list[dict[str, str]]:
    """Copy ``ami`` (the role's) to each --copy-to region; return what was made."""
    from dataclasses import asdict

    from builder.registry import RoleImage
    from builder.restore import copy_images

    raw = ec2.call("describe_images", ImageIds=[str(ami)])["Images"]
    if not raw:
        raise InvalidInput(f"{role}: no AMI {ami} in {ec2.region}")
    image = RoleImage.of(raw[0])
    regions = list(dict.fromkeys(args.copy_to))
    if ec2.region in regions:
        raise InvalidInput(f"--copy-to {ec2.region}: that is the AMI's own region")
    targets = {region: _connect(args, region) for region in regions}  # a bad region stops before any copy
    started = time.monotonic()
    log.info("%s: copying %s to %s at once ...", role, image.image_id, ", ".join(regions))
    made = [asdict(c) for c in copy_images(ec2, targets, image)]
    log.info("%s: copies done after %.1f s", role, time.monotonic() - started)
    return made


def _build_many(args: argparse.Namespace, names: list[str]) -> int:
    """Build several roles, each in its own build.py process; print the summary table."""
    from builder import batch
    from builder.pipeline import new_build_id

    if args.sandbox:
        _connect(args)  # start the sandbox once, before the builds look for it
    batch_id = new_build_id()
    manifests = {name: Path("manifests") / f"{name}-{batch_id}.json" for name in names}
    passed = _passthrough(args)
    argv_for = {name: [name, *passed, "--manifest", str(manifests[name])] for name in names}
    log.info("building %d roles, %d at a time: %s", len(names), args.jobs, " ".join(names))
    outcomes, interrupted = batch.run(names, argv_for, manifests, args.jobs, sys.stderr)
    _print(batch.summary_json(outcomes) if args.format == "json" else batch.summary_table(outcomes))
    if interrupted is not None:
        raise interrupted
    return batch.exit_code(outcomes)


def _passthrough(args: argparse.Namespace) -> list[str]:
    """Return the options a one-role build.py needs to build as this command would."""
    argv: list[str] = []
    valued = {
        "--roles-dir": args.roles_dir,
        "--region": args.region,
        "--profile": args.profile,
        "--endpoint-url": None if args.sandbox else args.endpoint_url,
        "--ssh-user": args.ssh_user,
        "--ssh-host": args.ssh_host,
        "--ssh-port": args.ssh_port,
        "--ssh-cidr": args.ssh_cidr,
        "--subnet-id": args.subnet_id,
        "--security-group-id": args.security_group_id,
        "--timeout": args.timeout,
        "--ssh-timeout": args.ssh_timeout,
    }
    for flag, value in valued.items():
        if value is not None:
            argv += [flag, str(value)]
    for region in args.copy_to or ():
        argv += ["--copy-to", region]
    flags = {
        "--sandbox": args.sandbox,
        "--keep-on-failure": args.keep_on_failure,
        "--if-changed": args.if_changed,
        "--verbose": args.verbose,
        "--debug": args.debug,
    }
    return argv + [flag for flag, on in flags.items() if on]


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """Print each role's fingerprint."""
    from builder.fingerprint import fingerprint
    from builder.registry import fingerprints
    from builder.roles import load_roles

    roles = load_roles(args.roles, _roles_dir(args))
    if args.base_ami:
        found = {r.name: fingerprint(r, args.base_ami) for r in roles}
    else:
        found = fingerprints(_connect(args), roles)
    if args.format == "json":
        doc = [{"role": f.role, "fingerprint": f.value, "base_ami": f.base_ami} for f in found.values()]
        _print(json.dumps({"fingerprints": doc}, indent=2))
    else:
        for f in found.values():
            _print(f"{f.role}  {f.value}  base {f.base_ami}")
    return ExitCode.OK


def cmd_changed(args: argparse.Namespace) -> int:
    """Print the roles whose fingerprint has no AMI in the region."""
    from builder.registry import changes
    from builder.roles import load_roles

    roles = load_roles(args.roles, _roles_dir(args))
    ec2 = _connect(args)
    found = changes(ec2, roles)
    names = [c.role for c in found if c.changed]
    if args.format == "github-matrix":
        # `strategy.matrix: ${{ fromJSON(...) }}`; an empty list means there is nothing to build.
        _print(json.dumps({"role": names}, separators=(",", ":")))
    elif args.format == "json":
        doc = {
            "changed": names,
            "roles": [
                {
                    "role": c.role,
                    "fingerprint": c.fingerprint.value,
                    "base_ami": c.fingerprint.base_ami,
                    "changed": c.changed,
                    "ami": c.image.image_id if c.image else None,
                }
                for c in found
            ],
            "api_calls": ec2.total_calls,
        }
        _print(json.dumps(doc, indent=2))
    else:
        for name in names:
            _print(name)
    return ExitCode.OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Deregister older AMIs of a role and delete their snapshots."""
    from dataclasses import asdict

    from builder.registry import prune
    from builder.roles import ROLE_NAME

    if not ROLE_NAME.match(args.role):
        raise InvalidInput(f"prune {args.role!r}: not a role name (lower-case letters, digits, -)")
    if args.keep < 1:
        raise InvalidInput(f"--keep {args.keep}: keep at least the newest AMI (1)")
    rows = prune(
        _connect(args),
        args.role,
        args.keep,
        dry_run=args.dry_run,
        include_shared=args.include_shared,
        check_ssm=not args.skip_ssm_check,
    )
    if args.format == "json":
        _print(json.dumps({"dry_run": args.dry_run, "images": [asdict(r) for r in rows]}, indent=2))
    elif not rows:
        _print(f"{args.role}: no AMIs")
    else:
        for r in rows:
            _print(f"{r.fate:18} {r.image_id:24} {r.created:26} {r.detail}".rstrip())
    return ExitCode.OK


def cmd_sweep(args: argparse.Namespace) -> int:
    """List (and unless --dry-run remove) leftovers of builds; with --volumes, the tool's available volumes."""
    from dataclasses import asdict

    from builder import sweep

    if args.volumes:
        return _sweep_volumes(args)
    if args.delete:
        raise InvalidInput("--delete goes with --volumes (leftovers of builds are removed unless --dry-run)")
    if args.build_id:
        sweep.check_build_id(args.build_id)
        older_than = sweep.parse_age(args.older_than) if args.older_than else 0.0
    else:
        floor = sweep.age_floor(args.build_time_limit)
        text = args.older_than or sweep.duration(floor)
        older_than = sweep.parse_age(text)
        sweep.check_older_than(older_than, text, floor, force=args.force)
    ec2 = _connect(args)
    surveyed = sweep.survey(ec2, older_than, build_id=args.build_id)
    found = [f for f in surveyed if f.fate == "found"]
    spared = [f for f in surveyed if f.fate == "spared"]
    if not args.dry_run:
        sweep.remove(ec2, found)
    if args.format == "json":
        doc = {"dry_run": args.dry_run, "resources": [asdict(f) for f in found], "spared": [asdict(f) for f in spared]}
        _print(json.dumps(doc, indent=2))
    elif not found:
        _print("nothing to sweep")
    else:
        for item in found:
            line = f"{item.fate:8} {item.kind:16} {item.id:24} build {item.build_id} role {item.role}"
            _print(f"{line} {item.error}".rstrip())
    if args.format != "json":
        for item in spared:  # what looked like a leftover, and why it stays: a note, not the result
            print(f"spared {item.kind} {item.id}: {item.reason}", file=sys.stderr)
    left = [f for f in found if f.fate == "left"]
    return ExitCode.LEFTOVERS if left else ExitCode.OK


def _sweep_volumes(args: argparse.Namespace) -> int:
    """sweep --volumes: list the tool's available volumes; delete them only with --delete."""
    from dataclasses import asdict

    from builder import sweep

    if args.build_id or args.older_than:
        raise InvalidInput("--volumes takes neither --build-id nor --older-than: it lists every available volume")
    ec2 = _connect(args)
    volumes = sweep.find_volumes(ec2)
    delete = args.delete and not args.dry_run
    if delete:
        sweep.remove(ec2, volumes)
    if args.format == "json":
        _print(json.dumps({"dry_run": not delete, "volumes": [asdict(v) for v in volumes]}, indent=2))
    elif not volumes:
        _print("no available volumes of the tool")
    else:
        for v in volumes:
            why = v.reason or v.error or v.note
            _print(f"{v.fate:8} {v.id:24} {v.tool_kind:14} role {v.role or '-'} {v.created_at:20} {why}".rstrip())
        if not delete:
            _print("(a list only: add --delete to delete those not spared)")
    left = [v for v in volumes if v.fate == "left"]
    return ExitCode.LEFTOVERS if left else ExitCode.OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Start, show, stop or reset the local sandbox."""
    from builder.sandbox import control

    if args.action == "start":
        latency = (args.latency, args.latency_scale, args.api_rate)
        current = control.start(releases=tuple(args.release or ("bookworm",)), latency=latency)
        result: dict[str, object] = {"running": True, "endpoint": current.endpoint, "pid": current.pid}
        text = f"sandbox running: EC2 endpoint {current.endpoint} (pid {current.pid}, state {control.STATE_DIR})"
    elif args.action == "stop":
        was = control.stop()
        result = {"running": False, "was_running": was}
        text = "sandbox stopped (state kept; reset deletes it)" if was else "sandbox was not running"
    elif args.action == "reset":
        control.reset()
        result = {"running": False, "reset": True}
        text = f"sandbox reset: {control.STATE_DIR} removed"
    elif args.action == "env":
        exports = control.env()
        result = {**exports}
        names = " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items())
        text = f"unset AWS_PROFILE AWS_SESSION_TOKEN\nexport {names}"
    else:
        result = control.status()
        text = _sandbox_text(result)
    _print(json.dumps(result, indent=2) if args.format == "json" else text)
    return ExitCode.OK


def _sandbox_text(status: dict[str, Any]) -> str:
    lines = [
        f"sandbox: {'running, EC2 endpoint ' + str(status['endpoint']) if status['running'] else 'not running'}"
        f" (state {status['state']})"
    ]
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
        model = ", ".join(f"{k} {v}" for k, v in status["latency"].items() if v)
        lines.append(f"  latency model: {model}; throttled calls: {status.get('throttled', 0)}")
    lines.append(f"  machines running: {' '.join(status['machines']) or 'none'}")
    lines.append(f"  loop devices: {' '.join(status['loop_devices']) or 'none'}")
    lines.append(f"  mounts: {' '.join(status['mounts']) or 'none'}")
    lines.append(f"  disk used: {status['bytes_on_disk'] / 2**20:.0f} MiB")
    return "\n".join(lines)


# ---------------------------------------------------------------- helpers


def _connect(args: argparse.Namespace, region: str | None = None) -> EC2:
    """Return the EC2 the command works against: AWS (standard chain), --endpoint-url, or the sandbox.

    ``region`` overrides --region (for a second region, as copies need).
    """
    from builder.ec2 import EC2

    if not args.sandbox:
        return EC2.connect(region or args.region, args.profile, args.endpoint_url)
    if args.profile or (args.endpoint_url and args.endpoint_url != getattr(args, "sandbox_endpoint", None)):
        raise InvalidInput("--sandbox is its own endpoint and credentials: drop --endpoint-url and --profile")
    from builder.sandbox import control

    current = control.ensure_started()
    args.endpoint_url = args.sandbox_endpoint = current.endpoint
    args.region = args.region or control.REGION
    ec2 = EC2.connect(region or args.region, None, current.endpoint, credentials=control.credentials())
    ec2.wait_scope = current.wait_scope
    return ec2


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Snapshot the data volumes of running role instances; apply retention."""
    import datetime as dt
    from dataclasses import asdict

    from builder.backups import apply_retention, role_instances, snapshot_instances, ssh_connector

    try:
        date = dt.date.fromisoformat(args.as_of) if args.as_of else dt.datetime.now(dt.UTC).date()
    except ValueError:
        raise InvalidInput(f"--as-of {args.as_of!r}: give a date as YYYY-MM-DD") from None
    today = dt.datetime.now(dt.UTC).date()
    if date > today:
        raise InvalidInput(f"--as-of {args.as_of}: a night in the future (today is {today.isoformat()}, UTC)")
    if args.keep_daily is not None and args.keep_daily < 1:
        raise InvalidInput(f"--keep-daily {args.keep_daily}: keep at least 1")
    if args.keep_weekly < 0:
        raise InvalidInput(f"--keep-weekly {args.keep_weekly}: at least 0")
    if (args.freeze or args.known_hosts) and not args.identity:
        raise InvalidInput("--freeze needs SSH to the instances: give --identity KEY_FILE")
    if not 1 <= args.freeze_timeout <= 900:
        raise InvalidInput(f"--freeze-timeout {args.freeze_timeout:g}: give 1 to 900 seconds")
    _require_role_files(args, args.roles)
    ec2 = _connect(args)
    instances = role_instances(ec2, args.roles or None, args.env)
    connect = None
    if args.identity:
        connect = ssh_connector(args.identity, args.known_hosts or Path.home() / ".ssh/known_hosts", args.ssh_user)
    results = snapshot_instances(
        ec2, instances, date, freeze=args.freeze, connect=connect, freeze_timeout=args.freeze_timeout
    )
    retention = []
    failures = [r for r in results if r.result == "failed"]
    for r in failures:  # a failed night deletes nothing: its older snapshots are all there is
        print(
            f"error: {r.role}: snapshot of volume {r.volume_id} ({r.instance_id}) failed: {r.error}; "
            "retention skipped, nothing deleted",
            file=sys.stderr,
        )
    if args.keep_daily is not None and not failures:
        volumes = [i.volume_id for i in instances]
        retention = apply_retention(ec2, volumes, args.keep_daily, args.keep_weekly, dry_run=args.dry_run)
    failed = any(r.result == "failed" for r in results) or any(r.fate == "left" for r in retention)
    if args.format == "json":
        doc = {
            "date": date.isoformat(),
            "snapshots": [asdict(r) for r in results],
            "retention": [asdict(r) for r in retention],
        }
        _print(json.dumps(doc, indent=2))
    else:
        if not results:
            _print("no running role instances")
        for r in results:
            frozen = f" {r.frozen_seconds:.3f} s" if r.frozen_seconds is not None else ""
            extra = (f" frozen{frozen}" if r.frozen else "") + (f": {r.error}" if r.error else "")
            if r.thawed_by == "watchdog":
                extra += " (the watchdog thawed it first: the snapshot may be crash-consistent only)"
            _print(f"{r.result:8} {r.role:16} {r.instance_id:20} {r.volume_id:22} {r.snapshot_id or '-'}{extra}")
        for k in retention:
            extra = (f" ({k.state})" if k.state != "completed" else "") + (f": {k.error}" if k.error else "")
            _print(f"{k.fate:14} {k.snapshot_id:24} {k.volume_id:22} {k.date or '-'}{extra}")
    return ExitCode.FAILED if failed else ExitCode.OK


def _require_roles(args: argparse.Namespace) -> None:
    """Raise InvalidInput when the roles directory is missing or holds no role: nothing to do is not success."""
    from builder.roles import display_path, role_names

    roles_dir = _roles_dir(args)
    if not roles_dir.is_dir():
        raise InvalidInput(f"{display_path(roles_dir)}: no such roles directory", hint="give --roles-dir DIR")
    if not role_names(roles_dir):
        raise InvalidInput(f"{display_path(roles_dir)}: no role files (ROLE.yaml) in the roles directory")


def _require_role_files(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Raise RoleNotFound for a named role without a role file: naming none would do nothing."""
    from builder.roles import display_path, role_names

    roles_dir = _roles_dir(args)
    known = role_names(roles_dir)
    for name in names:
        if name not in known:
            raise RoleNotFound(name, display_path(roles_dir), known)


def cmd_schedule(args: argparse.Namespace) -> int:
    """Print or create the role's DLM policy."""
    from builder.roles import load_role
    from builder.schedule import apply_policy, default_role_arn, dlm_policy

    load_role(args.role, _roles_dir(args))  # the role must exist
    if args.apply and args.sandbox:
        raise InvalidInput("the sandbox has no Data Lifecycle Manager: print the policy without --apply")
    ec2 = None
    arn = args.execution_role_arn
    if not arn:
        ec2 = _connect(args)
        arn = default_role_arn(ec2.account_id())
    policy = dlm_policy(
        args.role,
        execution_role_arn=arn,
        env=args.env,
        time=args.time,
        keep_daily=args.keep_daily,
        keep_weekly=args.keep_weekly,
        copy_to=args.copy_to,
    )
    if not args.apply:
        _print(json.dumps(policy, indent=2))
        return ExitCode.OK
    ec2 = ec2 or _connect(args)
    policy_id, done = apply_policy(ec2, args.role, args.env, policy)
    _print(f"{args.role}: DLM policy {policy_id} {done}")
    return ExitCode.OK


def cmd_launch(args: argparse.Namespace) -> int:
    """Launch instances of a role from a snapshot; with --wait, verify each over SSH."""
    from dataclasses import asdict

    from builder.keys import KeyPair
    from builder.live import verify_checks
    from builder.restore import choose_source, connect, current_image, drop_login, launch, login_user_data
    from builder.roles import load_role

    role = load_role(args.role, _roles_dir(args))
    if args.count < 1:
        raise InvalidInput(f"--count {args.count}: at least 1")
    ec2 = _connect(args)
    image = current_image(ec2, role.name)
    source_env = args.env if args.source_env is None else args.source_env  # production restores production's
    source = choose_source(ec2, role.name, image, args.source, source_env, allow_other_role=args.allow_other_role)
    login = KeyPair.generate(f"ebsrole-launch-{role.name}") if args.wait else None
    launched = launch(
        ec2,
        role,
        image,
        source,
        count=args.count,
        az=args.az,
        env=args.env,
        instance_type=args.instance_type,
        key_name=args.key_name,
        subnet_id=args.subnet_id,
        security_group_ids=args.security_group_id,
        user_data=login_user_data(login) if login else None,
    )
    failed = False
    for instance in launched:
        if login is None:
            continue
        remote = connect(ec2, instance, login, args.ssh_user)
        try:
            checks = verify_checks(remote, role)
            instance.verified = all(c["state"] == "ok" for c in checks)
            for check in checks:
                if check["state"] != "ok":
                    log.warning(
                        "%s: %s %s: %s", instance.instance_id, check["check"], check["subject"], check["detail"]
                    )
            drop_login(remote, login)
        finally:
            remote.close()
        failed = failed or not instance.verified
    if args.format == "json":
        _print(
            json.dumps(
                {
                    "role": role.name,
                    "image": image.image_id,
                    "source": asdict(source),
                    "instances": [asdict(i) for i in launched],
                },
                indent=2,
            )
        )
    else:
        for i in launched:
            state = {None: "", True: " verified", False: " FAILED verify"}[i.verified]
            _print(f"{role.name}: {i.instance_id} {i.az} {i.address} data from {i.snapshot_id}{state}")
    return ExitCode.FAILED if failed else ExitCode.OK


def cmd_drill(args: argparse.Namespace) -> int:
    """Run a restore drill; exit 0 when it passed."""
    from builder.pipeline import new_build_id, ssh_cidr
    from builder.restore import choose_source, current_image, drill
    from builder.roles import load_role

    role = load_role(args.role, _roles_dir(args))
    ec2 = _connect(args)
    cidr = ssh_cidr(args.ssh_cidr, ec2.endpoint_url)
    image = current_image(ec2, role.name)
    source = choose_source(
        ec2, role.name, image, args.source, args.source_env or "", allow_other_role=args.allow_other_role
    )
    report = drill(ec2, role, image, source, az=args.az, ssh_cidr=cidr, user=args.ssh_user, drill_id=new_build_id())
    if args.format == "json":
        _print(json.dumps(report.to_dict(), indent=2))
    else:
        verdict = "PASSED" if report.passed else "FAILED"
        _print(
            f"{role.name}: restore drill {verdict}: {source.kind} snapshot {source.snapshot_id} ({source.date}) "
            f"restored in {report.az} (from {report.source_az or '?'})"
        )
        if report.seconds_to_verified is not None:
            _print(f"  restored and verified in {report.seconds_to_verified} s; {report.seconds_total} s in all")
        for check in report.checks:
            _print(f"  {check['state']:4} {check['check']:10} {check['subject']} {check['detail']}".rstrip())
        for reason in report.reasons:
            _print(f"  reason: {reason}")
        for left in report.left_behind:
            _print(f"  LEFT BEHIND: {left}")
    if report.left_behind:
        return ExitCode.LEFTOVERS
    return ExitCode.OK if report.passed else ExitCode.FAILED


def cmd_copy(args: argparse.Namespace) -> int:
    """Copy the role's AMI to other regions."""
    from builder.registry import role_images
    from builder.roles import ROLE_NAME

    if not ROLE_NAME.match(args.role):
        raise InvalidInput(f"copy {args.role!r}: not a role name")
    ec2 = _connect(args)
    ami = args.ami
    if not ami:
        images = role_images(ec2, roles=[args.role])
        if not images:
            raise InvalidInput(
                f"no AMI of role {args.role} in {ec2.region}", hint=f"build it: python build.py {args.role}"
            )
        ami = images[0].image_id
    copies = _copy_to(argparse.Namespace(**{**vars(args), "copy_to": args.to}), ec2, args.role, ami)
    if args.format == "json":
        _print(json.dumps(copies[0] if len(copies) == 1 else copies, indent=2))
    else:
        for c in copies:
            source = f"{c['source_ami']} ({c['source_region']})"
            _print(f"{args.role}: {source} -> {c['ami']} in {c['region']}, seed snapshot {c['seed_snapshot']}")
    return ExitCode.OK


def _check_writable_dir(path: Path, what: str) -> None:
    """Raise InvalidInput unless ``path`` is (or can be made) a writable directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ebsrole-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InvalidInput(f"{what}: cannot write in {path}: {exc.strerror}") from None


def _print(text: str) -> None:
    print(text, flush=True)
