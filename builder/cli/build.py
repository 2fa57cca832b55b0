"""build: the role AMIs of the roles named (or --all), one at a time or --jobs at once.

The options become one BuildRequest: where EC2 is, the BuildOptions of each build and what
to do with its AMI. With several roles each build is its own process, handed that same
request (as JSON) with only its role and manifest changed: no option is spelled out again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import __version__
from builder.cli import output
from builder.cli.context import Target, check_writable_dir, connect, load_roles, require_roles, roles_dir
from builder.cli.options import aws_options, port, publish_options, reach_options, seconds
from builder.cli.registry import Parser, command_list, prog
from builder.errors import ExitCode, InvalidInput, exit_code_help

if TYPE_CHECKING:
    from builder.aws.ec2 import EC2
    from builder.pipeline import BuildOptions
    from builder.roles import Role

log = logging.getLogger("builder")


def parser(common: Parser) -> Parser:
    """Return the parser of a build: ``ROLE [ROLE...] | --all [options]``."""
    name = prog()
    p = Parser(
        prog=name,
        parents=[common],
        usage=f"{name} ROLE [ROLE...] | --all [options]\n       {name} COMMAND ... "
        f"(see the commands below, and {name} COMMAND --help)",
        description="Build the role AMI of each ROLE, paired with the seed snapshot of its data volume.\n\n"
        f"commands:\n{command_list()}\n\n--sandbox on any command that talks to EC2 runs it against the "
        "local sandbox, started\nwhen needed: no AWS account, same code path.\n",
        epilog=exit_code_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("roles", nargs="*", metavar="ROLE", help="role names (files roles/ROLE.yaml)")
    p.add_argument("--all", action="store_true", help="every role of the roles directory")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="with several roles: build N at a time (default 1)")
    p.add_argument(
        "--if-changed",
        action="store_true",
        help="skip a role whose fingerprint already has an AMI; print that AMI instead",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="the result lines (or summary)")
    p.add_argument("--version", action="version", version=f"ebsrole {__version__}")
    p.add_argument("--request", help=argparse.SUPPRESS)  # one build of a --jobs run: its BuildRequest as JSON
    aws_options(p)
    ssh = p.add_argument_group("the builder")
    ssh.add_argument("--ssh-user", default="admin", help="login user of the base AMI (default admin)")
    ssh.add_argument("--ssh-host", help="reach the builder at this address instead of its EC2 address")
    ssh.add_argument("--ssh-port", type=port, default=22, help="and this port (default 22)")
    ssh.add_argument("--subnet-id", help="launch the builder in this subnet (default: the default VPC)")
    ssh.add_argument("--instance-profile", metavar="NAME|ARN", help="the builder's IAM instance profile")
    ssh.add_argument("--security-group-id", help="use this security group instead of making one")
    ssh.add_argument(
        "--timeout", type=seconds, default=3600, help="build time limit in s; the builder powers off after it"
    )
    ssh.add_argument("--ssh-timeout", type=seconds, default=600, help="how long to wait for SSH (s)")
    ssh.add_argument(
        "--stop", action="store_true", help="stop the builder before its snapshots (default: freeze it, no stop)"
    )
    reach_options(p, launches=True, admits=True)
    image = p.add_argument_group("the AMI (docs/howto/accounts.md)")
    image.add_argument("--kms-key-id", metavar="KEY", help="customer-managed key of the root volume and root snapshot")
    when = image.add_mutually_exclusive_group()
    when.add_argument("--deprecate-at", metavar="DATE", help="deprecate the AMI then (YYYY-MM-DD or an ISO time, UTC)")
    when.add_argument("--deprecate-after", type=int, metavar="DAYS", help="deprecate the AMI this many days on")
    image.add_argument("--protect", action="store_true", help="deregistration protection on it, off the previous")
    out = p.add_argument_group("results")
    out.add_argument(
        "--manifest",
        dest="manifest_path",
        type=Path,
        help="write the manifest here (one role only; default manifests/ROLE-BUILD.json)",
    )
    out.add_argument(
        "--keep-on-failure", action="store_true", help="keep the builder when the build fails, to debug it"
    )
    out.add_argument(
        "--copy-to", action="append", metavar="REGION", help="then copy the AMI and its snapshots there (repeatable)"
    )
    publish_options(p, env=True)
    p.set_defaults(run=run)
    return p


@dataclass(frozen=True)
class BuildRequest:
    """A build command's options: where EC2 is, how each role is built, where its AMI is copied."""

    target: Target
    roles_dir: str | None
    options: BuildOptions  # its ssh_cidr as given: each build settles whom it admits before creating anything
    copy_to: tuple[str, ...] = ()

    @classmethod
    def of(cls, args: argparse.Namespace) -> BuildRequest:
        """Return the request the options of ``args`` make (each BuildOptions field from its option)."""
        from builder.pipeline import BuildOptions

        given = {f.name: getattr(args, f.name) for f in fields(BuildOptions) if hasattr(args, f.name)}
        roles_dir = str(args.roles_dir) if args.roles_dir else None
        return cls(Target.of(args), roles_dir, BuildOptions(**given), tuple(args.copy_to or ()))

    def to_json(self) -> str:
        """Return the request as JSON, for a build process of its own."""
        options = {f.name: getattr(self.options, f.name) for f in fields(self.options) if f.name != "connect"}
        options["manifest_path"] = str(self.options.manifest_path) if self.options.manifest_path else None
        doc = {"target": asdict(self.target), "roles_dir": self.roles_dir, "options": options, "copy_to": self.copy_to}
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> BuildRequest:
        """Return the request :meth:`to_json` wrote."""
        from builder.pipeline import BuildOptions

        doc: dict[str, Any] = json.loads(text)
        options = doc["options"]
        manifest = Path(options.pop("manifest_path")) if options.get("manifest_path") else None
        built = BuildOptions(**options, manifest_path=manifest)
        return cls(Target(**doc["target"]), doc["roles_dir"], built, tuple(doc["copy_to"]))


def run(args: argparse.Namespace) -> int:
    """Build the role AMIs: one in this process, several as one process each (--jobs at a time)."""
    request = BuildRequest.from_json(args.request) if args.request else BuildRequest.of(args)
    if args.all == bool(args.roles):
        raise InvalidInput("name the roles to build, or give --all (not both)")
    if args.jobs < 1:
        raise InvalidInput(f"--jobs {args.jobs}: must be at least 1")
    where = Path(request.roles_dir) if request.roles_dir else roles_dir(args)
    require_roles(where)
    roles = load_roles(where, None if args.all else args.roles)
    manifest = request.options.manifest_path
    if manifest and len(roles) > 1:
        raise InvalidInput("--manifest names one file: give it with one role only")
    check_writable_dir(manifest.parent if manifest else Path("manifests"), f"--manifest {manifest}")
    if len(roles) > 1:
        return _build_many(args, request, [r.name for r in roles])
    from builder.pipeline import build

    ec2 = connect(request.target)
    # Whom SSH is admitted from is settled by the build before it creates anything.
    made = build(roles[0], ec2, replace(request.options, endpoint_url=ec2.endpoint_url))
    copies = _copy(request, ec2, roles[0], made.ami) if request.copy_to else []
    output.emit(output.built(made, copies, args.format))
    # Not publishing loses nothing: the AMI stands (exit 0), and the warning says how to publish it.
    warning = output.unpublished([(made.region, made.published), *((c["region"], c["published"]) for c in copies)])
    if warning:
        output.note(warning)
    return ExitCode.OK


def _copy(request: BuildRequest, ec2: EC2, role: Role, ami: str | None) -> list[dict[str, Any]]:
    """Copy the AMI just built to each --copy-to region (keys: the role's copy_kms_key_ids); return what was made."""
    from builder.copy import copy_to_regions

    options = request.options
    keys = {r: k for r, k in role.copy_kms_key_ids if r in request.copy_to}
    made = copy_to_regions(
        ec2,
        lambda region: connect(request.target, region),
        role.name,
        str(ami),
        request.copy_to,
        keys=keys,
        publish_to=options.publish,
        env=options.publish_env,
    )
    return [asdict(c) for c in made]


def _build_many(args: argparse.Namespace, request: BuildRequest, names: list[str]) -> int:
    """Build several roles, each in its own process; print the summary table."""
    from builder import batch
    from builder.pipeline import new_build_id

    if request.target.sandbox:
        connect(request.target)  # start the sandbox once, before the builds look for it
    batch_id = new_build_id()
    manifests = {name: Path("manifests") / f"{name}-{batch_id}.json" for name in names}
    logging_flags = [flag for flag, on in (("--debug", args.debug), ("--verbose", args.verbose)) if on]
    argv_for = {
        name: [name, "--request", _for_one(request, manifests[name]).to_json(), *logging_flags] for name in names
    }
    log.info("building %d roles, %d at a time: %s", len(names), args.jobs, " ".join(names))
    outcomes, interrupted = batch.run(names, argv_for, manifests, args.jobs, sys.stderr)
    output.emit(batch.summary_json(outcomes) if args.format == "json" else batch.summary_table(outcomes))
    if interrupted is not None:
        raise interrupted
    return batch.exit_code(outcomes)


def _for_one(request: BuildRequest, manifest: Path) -> BuildRequest:
    return replace(request, options=replace(request.options, manifest_path=manifest))
