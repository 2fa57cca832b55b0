"""The one exception tree of the builder.

Every error the tool raises on purpose derives from :class:`BuildError`. Each class
carries the data that explains it and renders its own message: what failed, where,
and a ``hint:`` line. The exit code for each kind lives on the class and is turned
into a process exit code in exactly one place (``builder.cli``).

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Protocol


class ExitCode(IntEnum):
    """Process exit codes: ``--help`` and the docs print them from here (:func:`exit_code_table`)."""

    OK = 0
    FAILED = 1  # a build or command failed for a reason not listed below
    INVALID_INPUT = 2  # bad role file, bad arguments: nothing was touched
    CLOUD = 3  # EC2 refused or failed a call (credentials, region, limits)
    REMOTE = 4  # a provisioning script failed on the builder
    CONNECTION = 5  # SSH could not connect, or the host key did not match
    LEFTOVERS = 6  # the build failed AND cleanup could not remove everything
    ENVIRONMENT = 7  # this machine lacks something (root, a Debian package, loop devices)
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    TERMINATED = 143  # SIGTERM

    @property
    def meaning(self) -> str:
        """Return what this exit code tells a user, as ``--help`` and the README say it."""
        return MEANINGS[self]


MEANINGS: Final[Mapping[ExitCode, str]] = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "the build or command failed",
    ExitCode.INVALID_INPUT: "invalid input (role file, arguments): nothing was touched",
    ExitCode.CLOUD: "EC2 refused or failed a call",
    ExitCode.REMOTE: "a provisioning script failed on the builder",
    ExitCode.CONNECTION: "SSH could not connect, or the host key did not match",
    ExitCode.LEFTOVERS: "the build failed and cleanup could not remove everything (ids are listed)",
    ExitCode.ENVIRONMENT: "this machine lacks something the command needs (root, a Debian package)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
    ExitCode.TERMINATED: "terminated (SIGTERM)",
}


def exit_code_help() -> str:
    """Return the exit codes as ``--help`` lists them (its epilog)."""
    return "exit codes:\n" + "".join(f"  {code.value:<4}{code.meaning}\n" for code in ExitCode)


def exit_code_table() -> str:
    """Return the exit codes as the Markdown table of the README and the docs."""
    rows = [f"| {code.value} | `{code.name}` | {code.meaning} |" for code in ExitCode]
    return "\n".join(["| code | name | meaning |", "| --- | --- | --- |", *rows]) + "\n"


class Terminated(BaseException):
    """SIGTERM arrived; unwinds like KeyboardInterrupt so cleanup runs."""


class Unchanged(Exception):
    """--if-changed: an AMI of this fingerprint exists, nothing to build; names that AMI and its snapshots."""

    def __init__(self, image_id: str, seed_snapshot: str, root_snapshot: str) -> None:
        super().__init__(f"unchanged: {image_id}")
        self.image_id, self.seed_snapshot, self.root_snapshot = image_id, seed_snapshot, root_snapshot


class BuildError(Exception):
    """Base of every error the tool raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILED
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def render(self) -> str:
        """Return the message a user sees, with its hint line when there is one."""
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file: where it is and what is wrong."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"


class InvalidInput(BuildError):
    """Bad input found before anything touched the network."""

    exit_code = ExitCode.INVALID_INPUT


class InputFileInvalid(InvalidInput):
    """An input file cannot be read as data: unreadable, too large, not UTF-8, bad YAML, over a limit."""

    def __init__(self, file: str, where: str, what: str) -> None:
        self.problem = Problem(file, where, what)
        super().__init__(str(self.problem))


class RoleInvalid(InvalidInput):
    """One or more role files are invalid; carries every problem found."""

    hint = "the role format is described in docs/reference/roles.md and builder/schema/role.schema.json"

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = [str(p) for p in self.problems] + [f"{count} {noun} found"]
        super().__init__("\n".join(lines))


class RoleNotFound(InvalidInput):
    """A role named on the command line has no role file."""

    def __init__(self, name: str, roles_dir: str, known: Sequence[str]) -> None:
        self.name = name
        self.roles_dir = roles_dir
        self.known = tuple(known)
        listing = ", ".join(known) if known else "none"
        super().__init__(
            f"{roles_dir}/{name}.yaml: no such role",
            hint=f"roles in {roles_dir}: {listing}",
        )


class TemplateError(BuildError):
    """A template could not be rendered (a bug in a template, not in a role)."""

    def __init__(self, template: str, detail: str) -> None:
        self.template = template
        super().__init__(f"builder/templates/{template}: {detail}")


@dataclass(frozen=True)
class CommandResult:
    """What a remote command did: the command, its exit status and its output."""

    command: str
    exit_status: int  # -1: no exit status (killed by a signal)
    stdout: str
    stderr: str

    def tail(self, lines: int = 20) -> str:
        """Return the last ``lines`` lines of output (stdout and stderr)."""
        text = (self.stdout + ("\n" if self.stdout and self.stderr else "") + self.stderr).rstrip("\n")
        return "\n".join(text.splitlines()[-lines:])


class SSHError(BuildError):
    """SSH to a machine failed: unreachable, refused, host key or login refused, or lost."""

    exit_code = ExitCode.CONNECTION


class SSHConnectFailed(SSHError):
    """No SSH session could be opened before the deadline."""

    def __init__(self, host: str, port: int, reason: str, waited: float, *, proxy: str | None = None) -> None:
        self.host, self.port, self.reason, self.waited, self.proxy = host, port, reason, waited, proxy
        hint = "is the instance up, and does the security group admit this address on tcp/22?"
        if proxy:
            hint = f"the proxy command was: {proxy}; run it by hand to see it reach {host}:{port}"
        super().__init__(f"ssh {host}:{port}: no connection after {waited:.0f} s: {reason}", hint=hint)


class HostKeyMismatch(SSHError):
    """The server did not present the pinned host key: never retried."""

    def __init__(self, host: str, port: int, expected: str, got: str) -> None:
        self.host, self.port, self.expected, self.got = host, port, expected, got
        super().__init__(
            f"ssh {host}:{port}: host key {got} is not the pinned key {expected}; refusing to connect",
            hint="something else answers at that address, or the instance did not take the host key from its user-data",
        )


class SSHAuthFailed(SSHError):
    """The server refused the temporary login key: never retried."""

    def __init__(self, host: str, port: int, user: str) -> None:
        self.host, self.port, self.user = host, port, user
        super().__init__(
            f"ssh {user}@{host}:{port}: the login key was refused",
            hint="check --ssh-user (Debian AMIs log in as admin)",
        )


class ConnectionLost(SSHError):
    """The SSH connection ended while a command was still running."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        tail = result.tail()
        super().__init__(
            f"ssh connection lost while running {result.command!r}" + (f"; last output:\n{tail}" if tail else ""),
        )


class RemoteCommandFailed(BuildError):
    """A remote command or script exited non-zero."""

    exit_code = ExitCode.REMOTE

    def __init__(self, result: CommandResult, what: str | None = None) -> None:
        self.result = result
        tail = result.tail()
        how = "was killed by a signal" if result.exit_status == -1 else f"exited {result.exit_status}"
        super().__init__(f"{what or repr(result.command)} {how}" + (f"; last output:\n{tail}" if tail else ""))


class RemoteTimeout(BuildError):
    """A remote command ran past its time limit."""

    exit_code = ExitCode.REMOTE

    def __init__(self, result: CommandResult, limit: float) -> None:
        self.result = result
        super().__init__(f"{result.command!r} still running after {limit:.0f} s; last output:\n{result.tail()}")


class EnvironmentProblem(BuildError):
    """This machine lacks something a command needs: root, a tool, loop devices."""

    exit_code = ExitCode.ENVIRONMENT


class FreezeRefused(BuildError):
    """The mount point to freeze is not a mount of the role's data volume: nothing was frozen."""

    def __init__(self, instance_id: str, mount_point: str, volume_id: str, reason: str) -> None:
        self.instance_id, self.mount_point, self.volume_id, self.reason = instance_id, mount_point, volume_id, reason
        super().__init__(
            f"{instance_id}: refusing to freeze {mount_point} for volume {volume_id}: {reason}",
            hint=f"mount the data volume at {mount_point} (it is in /etc/fstab), or snapshot without --freeze",
        )


class CloudError(BuildError):
    """EC2 refused or failed a call."""

    exit_code = ExitCode.CLOUD

    def __init__(self, operation: str, code: str, message: str, hint: str | None = None) -> None:
        self.operation, self.code = operation, code
        super().__init__(f"EC2 {operation}: {code}: {message}", hint=hint)


class WaitTimeout(CloudError):
    """A resource did not reach the wanted state in time."""

    def __init__(self, what: str, wanted: str, last: str, limit: float) -> None:
        super().__init__("wait", "Timeout", f"{what} still {last!r} after {limit:.0f} s (wanted {wanted!r})")


class LeftBehind(BuildError):
    """Cleanup could not remove everything; names what is left."""

    exit_code = ExitCode.LEFTOVERS

    def __init__(self, left: list[tuple[str, str, str]], cause: BaseException | None, build_id: str = "") -> None:
        self.left, self.cause = left, cause
        lines = [f"  {kind} {rid}: {why}" for kind, rid, why in left]
        head = f"build failed ({cause}); and cleanup" if cause else "cleanup"
        # This build's id, never a region-wide age: other builds may be running.
        sweep = f"python build.py sweep --build-id {build_id}" if build_id else "python build.py sweep"
        super().__init__(
            f"{head} left {len(left)} resource(s) behind:\n" + "\n".join(lines),
            hint=f"remove them by hand, or run: {sweep}",
        )


class _Copy(Protocol):
    """A completed region copy, as CopiesFailed names it."""

    @property
    def region(self) -> str: ...

    @property
    def ami(self) -> str: ...


class CopiesFailed(BuildError):
    """Some copies failed; the others are complete. Names each failure."""

    def __init__(self, failed: dict[str, BuildError], done: Sequence[_Copy]) -> None:
        self.failed, self.done = failed, list(done)
        self.exit_code = next(iter(failed.values())).exit_code
        lines = [f"copy to {region}: {exc}" for region, exc in failed.items()]
        lines += [f"copy to {c.region}: done, AMI {c.ami}" for c in done]
        super().__init__("; ".join(lines), hint="run the copy again: it resumes each copy EC2 already has")


# ---------------------------------------------------------------- the sandbox


class MachineError(BuildError):
    """A local machine failed to start, or a step on it failed; carries the console's tail."""

    def __init__(self, name: str, what: str, console: str = "") -> None:
        self.name = name
        tail = f"\nlast console lines:\n{console}" if console else ""
        super().__init__(f"machine {name}: {what}{tail}")


class DataPlaneError(BuildError):
    """A data-plane step failed; ``code`` is the EC2 error code to answer with."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class EC2Error(Exception):
    """An error to answer the sandbox's current EC2 call with, as AWS would (never raised to a user)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class BrokerRefused(BuildError):
    """The sandbox's broker turned down a machine's request (mount, freeze); its text goes back inside."""


class KeyNotShareable(InvalidInput):
    """share: a snapshot of the AMI is encrypted with the AWS-managed key (aws/ebs), which no other account may use."""

    def __init__(self, image_id: str, snapshots: Sequence[str], statement: str) -> None:
        self.image_id, self.snapshots, self.statement = image_id, tuple(snapshots), statement
        super().__init__(
            f"{image_id}: snapshot {', '.join(snapshots)} is encrypted with the AWS-managed key aws/ebs, "
            "which cannot be shared; nothing was granted",
            hint="rebuild with a customer-managed key (build --kms-key-id KEY, or the role's root.kms_key_id and "
            "volume.kms_key_id) or copy with one (copy --kms-key-id REGION=KEY), and add to that key's policy: "
            + statement,
        )
