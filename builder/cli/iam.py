"""iam-policy: print the least-privilege IAM policy for some commands (builder.iam), offline."""

from __future__ import annotations

import argparse

from builder.cli import output
from builder.cli.context import load_roles, require_roles, roles_dir
from builder.cli.registry import Parser, add
from builder.errors import ExitCode, InvalidInput


def add_parsers(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """Add the parser of iam-policy."""
    p = add(sub, "iam-policy", common)
    p.add_argument(
        "--commands",
        metavar="CMD,CMD",
        help="the commands the policy is for, comma-separated (default: every command that calls AWS)",
    )
    p.add_argument(
        "--kms-key-arn",
        action="append",
        default=[],
        metavar="ARN",
        help="a customer-managed KMS key besides the roles' volume.kms_key_id (repeatable)",
    )
    p.add_argument(
        "--execution-role-arn", help="schedule: the IAM role DLM uses (default: the account's DLM default role)"
    )
    p.add_argument("--instance-role-arn", help="build, launch, drill: the role of the instance profile they pass")
    p.add_argument(
        "--format",
        choices=("json", "text"),
        default="json",
        help="json: the policy document; text: each action with the commands that need it",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the policy (or the actions) for --commands; the roles' KMS keys add KMS statements."""
    from builder import iam

    names = [n.strip() for n in args.commands.split(",")] if args.commands else list(iam.known())
    if not all(names):
        raise InvalidInput(
            f"--commands {args.commands!r}: an empty command name", hint="e.g. --commands build,snapshot"
        )
    commands = iam.check_commands(names)
    where = roles_dir(args)
    if args.roles_dir:
        require_roles(where)
    roles = load_roles(where, None) if where.is_dir() else []  # the default roles/ may be absent
    document = iam.policy(
        commands,
        roles,
        kms_key_arns=args.kms_key_arn,
        execution_role_arn=args.execution_role_arn,
        instance_role_arn=args.instance_role_arn,
    )
    output.emit(output.iam_policy(document, iam.needed_by(commands), args.format))
    return ExitCode.OK
