"""The SSM parameters that publish a role's AMI and snapshots, so that other tools find them by name.

The names, in one place (``<env>`` as ``launch --env`` tags instances, ``ebsrole:env``):

- ``/ebsrole/<role>/ami``: the role's current AMI (data type ``aws:ec2:image``), written
  by each build (also an unchanged ``--if-changed`` one) and each copy, in its region;
- ``/ebsrole/<role>/seed-snapshot``: that AMI's seed snapshot (text), written with it;
- ``/ebsrole/<role>/<env>/ami``: the AMI an environment runs (``aws:ec2:image``), written
  only when a build or copy is given ``--env ENV``: a promotion, never implicit;
- ``/ebsrole/<role>/<env>/latest-snapshot``: the environment's newest *completed*
  nightly snapshot (text), written by ``snapshot``; instances without an environment
  publish ``/ebsrole/<role>/latest-snapshot``.

A parameter is written only when its value differs (a re-run makes no new version), with
``Overwrite`` and a description saying what wrote it, then tagged (``AddTagsToResource``:
``PutParameter`` refuses tags together with ``Overwrite``). An ``aws:ec2:image`` value is
validated by SSM after the call returns, so it is read back until it shows. Writing never
raises: each parameter's outcome is returned, and the caller warns about failures, because
a failure to publish must not lose the AMI or snapshot it names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from builder import tags
from builder.aws.ec2 import EC2
from builder.errors import BuildError, InvalidInput

log = logging.getLogger(__name__)

ROOT = "/ebsrole"  # registry.SSM_PATH is this with a slash: prune reads what is published here
IMAGE = "aws:ec2:image"
TEXT = "text"
# One level of a parameter path: SSM allows a-zA-Z0-9_.- in names; a leading letter or digit.
ENV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
VALIDATION_TIMEOUT = 60.0  # s: how long SSM may take to accept an aws:ec2:image value
BATCH = 10  # names one GetParameters takes at most


@dataclass(frozen=True)
class Parameter:
    """One parameter to publish: its name, value, data type and the description saying who wrote it."""

    name: str
    value: str
    data_type: str
    description: str


@dataclass
class Published:
    """What became of one parameter: ``written``, ``unchanged`` (already that value) or ``failed``."""

    name: str
    value: str
    outcome: str
    error: str | None = None  # failed: why; written: a tagging failure (the value is right)


def ami_name(role: str, env: str = "") -> str:
    """Return the parameter that names ``role``'s AMI (``env``: that environment's)."""
    return f"{ROOT}/{role}/{env}/ami" if env else f"{ROOT}/{role}/ami"


def seed_snapshot_name(role: str) -> str:
    """Return the parameter that names the seed snapshot of ``role``'s AMI."""
    return f"{ROOT}/{role}/seed-snapshot"


def latest_snapshot_name(role: str, env: str) -> str:
    """Return the parameter that names ``env``'s newest completed nightly snapshot (no env: the role's)."""
    return f"{ROOT}/{role}/{env}/latest-snapshot" if env else f"{ROOT}/{role}/latest-snapshot"


def check_env(env: str, where: str) -> None:
    """Raise InvalidInput when ``env`` cannot be one level of a parameter path; ``where`` names the input."""
    if env and not ENV_NAME.fullmatch(env):
        raise InvalidInput(
            f"{where} {env!r}: not usable in an SSM parameter name",
            hint="an environment is 1 to 63 of A-Z a-z 0-9 _ . - starting with a letter or digit",
        )


def image_parameters(role: str, ami: str, seed: str, writer: str, envs: Sequence[str] = ()) -> list[Parameter]:
    """Return the parameters of a role AMI: the role's AMI and seed snapshot, and each of ``envs``' AMI."""
    said = f"{tags.TOOL} {writer}: role {role}"
    made = [Parameter(ami_name(role), ami, IMAGE, f"{said}: current AMI")]
    if seed:
        made.append(Parameter(seed_snapshot_name(role), seed, TEXT, f"{said}: seed snapshot of {ami}"))
    made += [Parameter(ami_name(role, env), ami, IMAGE, f"{said}: AMI of environment {env}") for env in envs]
    return made


def snapshot_parameter(role: str, env: str, snapshot_id: str, date: str) -> Parameter:
    """Return the parameter naming the newest completed nightly snapshot of ``role`` in ``env``."""
    where = f"environment {env}" if env else "no environment"
    description = f"{tags.TOOL} snapshot: role {role}, {where}: newest completed nightly snapshot ({date})"
    return Parameter(latest_snapshot_name(role, env), snapshot_id, TEXT, description)


def publish(ec2: EC2, parameters: Sequence[Parameter], role: str, env: str = "") -> list[Published]:
    """Write each of ``parameters`` whose value differs in ``ec2``'s region; return each one's outcome.

    Never raises BuildError: a parameter that cannot be read or written is ``failed``.
    """
    try:
        current = _current(ec2, [p.name for p in parameters])
    except BuildError as exc:
        return [Published(p.name, p.value, "failed", _first_line(exc)) for p in parameters]
    done = []
    for parameter in parameters:
        if current.get(parameter.name) == (parameter.value, parameter.data_type):
            done.append(Published(parameter.name, parameter.value, "unchanged"))
            continue
        done.append(_write(ec2, parameter, tags.parameter(role, env)))
    for item in done:
        log.info("%s: SSM parameter %s = %s: %s", role, item.name, item.value, item.outcome)
    return done


def _write(ec2: EC2, parameter: Parameter, tagged: dict[str, str]) -> Published:
    """Put one parameter, wait until SSM shows its value, tag it; return the outcome."""
    try:
        ec2.ssm_call(
            "put_parameter",
            Name=parameter.name,
            Value=parameter.value,
            Type="String",
            DataType=parameter.data_type,
            Description=parameter.description,
            Overwrite=True,
        )
        if parameter.data_type == IMAGE:  # validated after the call returns: a refusal shows as the old value
            ec2.wait_for(
                f"SSM parameter {parameter.name} to show {parameter.value}",
                lambda: _shows(ec2, parameter),
                "shown",
                timeout=VALIDATION_TIMEOUT,
            )
    except BuildError as exc:
        return Published(parameter.name, parameter.value, "failed", _first_line(exc))
    try:
        ec2.ssm_call(
            "add_tags_to_resource", ResourceType="Parameter", ResourceId=parameter.name, Tags=tags.tag_list(tagged)
        )
    except BuildError as exc:
        return Published(parameter.name, parameter.value, "written", f"not tagged: {_first_line(exc)}")
    return Published(parameter.name, parameter.value, "written")


def _shows(ec2: EC2, parameter: Parameter) -> str:
    """Return ``shown`` once SSM gives ``parameter``'s value, else ``validating``."""
    value, _ = _current(ec2, [parameter.name]).get(parameter.name, ("", ""))
    return "shown" if value == parameter.value else "validating"


def _current(ec2: EC2, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Return the value and data type of each of ``names`` that exists; raise CloudError."""
    found: dict[str, tuple[str, str]] = {}
    for start in range(0, len(names), BATCH):
        reply = ec2.ssm_call("get_parameters", Names=list(names[start : start + BATCH]))
        for item in reply.get("Parameters") or []:
            found[str(item["Name"])] = (str(item["Value"]), str(item.get("DataType") or TEXT))
    return found


def _first_line(exc: BuildError) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
