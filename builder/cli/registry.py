"""The command table and the global options: every list of commands derives from here.

A leaf: argparse and the standard library only, so ``--help`` stays fast. Each row names the
module of ``builder.cli`` that adds the command's parser (``add_parsers``) and runs it
(``run``); the help's command list, the reserved role names and the dispatch all read it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from builder.errors import ExitCode


@dataclass(frozen=True)
class Command:
    """One command: its name, the cli module that owns it, its line in the help, its own help's text."""

    name: str
    group: str
    summary: str
    description: str


COMMANDS = (
    Command(
        "validate",
        "roles",
        "check role files; every problem at once",
        "Check role files (all by default) and report every problem at once.",
    ),
    Command(
        "render",
        "roles",
        "print or write a role's scripts (no cloud access)",
        "Render a role's provisioning scripts: print them, or write them to --out DIR.",
    ),
    Command(
        "audit",
        "roles",
        "which paths each role puts on its volume (--registered: its AMIs; --instance: live)",
        "List the paths each role externalizes, with mount point, device and volume.",
    ),
    Command(
        "fingerprint",
        "roles",
        "the hash of everything that decides what a role's build produces",
        "Print each role's fingerprint: a hash of the role after defaults, the templates, "
        "the rendered scripts, the resolved base AMI and the tool version. The base AMI is looked "
        "up in the region unless --base-ami gives it.",
    ),
    Command(
        "changed",
        "roles",
        "the roles whose fingerprint has no AMI yet (what CI must build)",
        "List the roles (all by default) whose current fingerprint has no available AMI "
        "in the region: what CI must build. A fixed number of EC2 calls, however many roles.",
    ),
    Command(
        "prune",
        "images",
        "deregister a role's older AMIs and delete their snapshots",
        "Deregister the role's AMIs but the newest --keep, and delete their snapshots. "
        "Never one that an instance not yet terminated was launched from, that any launch template "
        "version names (also through resolve:ssm:), that an SSM parameter under /ebsrole/ holds, or "
        "that is shared with other accounts or public; never a snapshot another kept AMI uses. Each "
        "spared AMI is listed with its reason. When SSM cannot be read, nothing is deleted (exit 3).",
    ),
    Command(
        "snapshot",
        "backups",
        "nightly snapshots of the role instances' data volumes, with retention",
        "Snapshot the data volume of every running instance of the roles (all when none are "
        "named), one per volume and date; then apply the retention policy if given. Meant for cron.",
    ),
    Command(
        "schedule",
        "backups",
        "the same policy as an Amazon Data Lifecycle Manager policy",
        "Print (or with --apply create) a DLM policy that snapshots the role's data volumes "
        "daily and weekly, with the tool's tags, optionally copying to another region.",
    ),
    Command(
        "launch",
        "backups",
        "instances of a role, the data volume restored from a snapshot, in any AZ",
        "Instances of a role with the data volume restored from a snapshot.",
    ),
    Command(
        "drill",
        "backups",
        "a restore drill: restore into another AZ, check it, remove it, report",
        "A restore drill: restore into another AZ, check over SSH, remove, report.",
    ),
    Command(
        "template",
        "scaleout",
        "a role's launch template (data: a snapshot), optionally an Auto Scaling group on it",
        "Create or update the one launch template of a role and env (ebsrole-ROLE-ENV): each run adds a "
        "version whose data device maps the snapshot --from names, on the role's current AMI, and makes it "
        "the default. With --asg, create or update an Auto Scaling group on the template's default version "
        "(--refresh: start an instance refresh).",
    ),
    Command(
        "copy",
        "images",
        "copy a role AMI and its snapshots to another region, pairing kept",
        "Copy the role's current AMI (or --ami) with its snapshots to another region; tags and "
        "the AMI/seed-snapshot pairing are kept.",
    ),
    Command(
        "share",
        "images",
        "grant other accounts, an organization or an OU a role AMI and its snapshots",
        "Grant (--revoke: remove) the launch permission of the role's AMI and createVolumePermission on its "
        "snapshots. Refused, nothing granted, when a snapshot uses the AWS-managed key aws/ebs.",
    ),
    Command(
        "sweep",
        "images",
        "remove what killed builds left behind (found by tag)",
        "Find resources this tool made that belong to no finished build (temporary ones, "
        "AMIs and snapshots never completed) and remove them. Only resources whose tags (created-by "
        "ebsrole, a build id, a readable created-at) and naming (the build's security group, its "
        "builder's client token, an older build's key pair) agree; one without a readable created-at is "
        "never old. With --volumes instead: the "
        "tool's available (unattached) volumes, listed unless --delete.",
    ),
    Command(
        "iam-policy",
        "iam",
        "the least-privilege IAM policy for some commands (no cloud access)",
        "Print the IAM policy document the --commands need (all that call AWS by default): "
        "deleting only what the tool tagged, tagging at creation, KMS statements for the roles' "
        "customer-managed keys. --format text lists each action with the commands that need it.",
    ),
    Command(
        "sandbox",
        "sandbox",
        "start|status|stop|reset|env the local sandbox (EC2 endpoint + real machines)",
        "Run the local sandbox in the background (state kept on disk until reset): "
        "an EC2 endpoint on 127.0.0.1 whose instances are local Debian machines and whose "
        "volumes and snapshots are files.",
    ),
)
BY_NAME = {c.name: c for c in COMMANDS}
VERBS = tuple(BY_NAME)
GROUPS = tuple(dict.fromkeys(c.group for c in COMMANDS))
# Words a role file may not be called: each command, and words kept for the CLI.
RESERVED = frozenset({*VERBS, "help", "version", "build", "all"})
VALUELESS_GLOBALS = ("--debug", "--verbose", "-v")


def prog() -> str:
    """Return the name the program was run under: build.py in a checkout, ebsrole when installed."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "ebsrole" if name in ("", "__main__.py", "-c") else name


def command_list() -> str:
    """Return the help's command list, one line per command of the table."""
    return "\n".join(f"  {c.name.ljust(max(10, len(c.name) + 1))} {c.summary}" for c in COMMANDS)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are exit code 2 with one clear line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.INVALID_INPUT)


def common() -> Parser:
    """Return the parent parser of the options every command takes."""
    parser = Parser(add_help=False)
    parser.add_argument(
        "--roles-dir", type=Path, default=None, help="directory of role files (default: roles/ of this project)"
    )
    parser.add_argument("--debug", action="store_true", help="debug logging, and tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="stream remote script output")
    return parser


def add(sub: argparse._SubParsersAction[Parser], name: str, parent: Parser) -> Parser:
    """Add command ``name`` of the table to ``sub``: its summary and description from the table."""
    command = BY_NAME[name]
    return sub.add_parser(name, parents=[parent], help=command.summary, description=command.description)
