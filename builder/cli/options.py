"""The option groups several commands share: AWS, the snapshot to restore, SSH logins, reaching
instances, SSM publishing, and the argument types for ports and time limits.

A leaf, as the registry is: argparse and the standard library only, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def aws_options(parser: argparse.ArgumentParser) -> None:
    """Add where EC2 is: --region, --profile, --endpoint-url, --sandbox."""
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
    aws.add_argument("--role-arn", metavar="ARN", help="assume this IAM role for every call (session ebsrole-CMD)")
    aws.add_argument("--external-id", metavar="ID", help="the ExternalId the role's trust policy asks for")


def source_options(parser: argparse.ArgumentParser, source_env_help: str) -> None:
    """Add which snapshot a restore starts from: --from, --source-env, --allow-other-role (launch, drill, template)."""
    parser.add_argument(
        "--from",
        dest="source",
        default="latest",
        help="latest (the newest nightly snapshot; default), seed, or a snapshot id",
    )
    parser.add_argument("--source-env", help=source_env_help)
    parser.add_argument(
        "--allow-other-role",
        action="store_true",
        help="with --from SNAP: accept a snapshot of another role (never another account's or kind's)",
    )


def ssh_login_options(parser: argparse.ArgumentParser, title: str, whose: str) -> argparse._ArgumentGroup:
    """Add --identity, --known-hosts and --ssh-user for logging in to existing instances."""
    ssh = parser.add_argument_group(title)
    ssh.add_argument("--identity", type=Path, help="private key file to log in with")
    ssh.add_argument("--known-hosts", type=Path, help=f"known_hosts holding {whose} (default ~/.ssh/known_hosts)")
    ssh.add_argument("--ssh-user", default="admin", help="login user (default admin)")
    return ssh


def reach_options(parser: argparse.ArgumentParser, *, launches: bool = False, admits: bool = False) -> None:
    """Add how SSH reaches instances (builder.reach); ``launches``: --no-public-ip; ``admits``: --ssh-cidr etc."""
    reach = parser.add_argument_group("reaching instances (docs/howto/private-subnets.md)")
    methods, auto = ("public", "private", "proxy"), "default: public if the instance has a public IP"
    reach.add_argument("--connect", dest="connect_method", choices=methods, help=auto)
    proxy = reach.add_mutually_exclusive_group()
    proxy.add_argument("--ssh-proxy-command", metavar="CMD", help="ProxyCommand; %%h addr %%p port %%r user %%i id")
    proxy.add_argument("--bastion", metavar="[USER@]HOST[:PORT]", help="ssh -W through it, its host key pinned")
    reach.add_argument("--bastion-known-hosts", metavar="FILE", help="pins the bastion (default ~/.ssh/known_hosts)")
    reach.add_argument("--bastion-identity", metavar="FILE", help="the key to log in to the bastion (default: ssh's)")
    if admits:
        source = reach.add_mutually_exclusive_group()
        source.add_argument("--ssh-cidr", help="admit SSH from it (default: the VPC's if private, else this host)")
        source.add_argument("--ssh-source-group", metavar="SG_ID", help="admit SSH from this group's members")
    if launches:
        reach.add_argument("--no-public-ip", action="store_true", help="in --subnet-id or the default subnet")


def port(text: str) -> int:
    """Return ``text`` as a TCP port; argparse reports a bad one as a usage error (exit 2)."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 1 to 65535")
    return number


def seconds(text: str) -> float:
    """Return ``text`` as a time limit in s: more than 0 and at most 7 days (the dead-man switch)."""
    from builder.pipeline import MAX_TIMEOUT

    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value <= MAX_TIMEOUT:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, more than 0 and at most {MAX_TIMEOUT} (7 days)")
    return value


def publish_options(parser: argparse.ArgumentParser, *, env: bool) -> None:
    """Add --no-publish (and with ``env``, --env ENV): the SSM parameters of builder.publish."""
    ssm = parser.add_argument_group("SSM parameters (docs/reference/parameters.md)")
    no = "write no SSM parameter /ebsrole/ROLE/... (accounts where SSM is not allowed)"
    ssm.add_argument("--no-publish", dest="publish", action="store_false", help=no)
    if env:
        also = "also publish the AMI as environment ENV's: /ebsrole/ROLE/ENV/ami"
        ssm.add_argument("--env", dest="publish_env", default="", metavar="ENV", help=also)
