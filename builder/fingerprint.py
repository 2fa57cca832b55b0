"""A role's fingerprint: one hash of everything that decides what its build produces.

The inputs are the role after defaults (its values, not its YAML: key order and
comments do not count), the template sources, the scripts rendered from them, the
resolved base AMI id and the tool's version. Two builds with the same fingerprint make
the same AMI, so a role whose fingerprint already has an AMI need not be built again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import __version__
from builder.render import TEMPLATES_DIR, render_role
from builder.roles import Role

FORMAT = 1  # bump when the recipe below changes
LENGTH = 32  # hex digits kept: 128 bits


@dataclass(frozen=True)
class Fingerprint:
    """A role's fingerprint and what went into it."""

    role: str
    value: str
    base_ami: str
    inputs: dict[str, Any]


def role_values(role: Role) -> dict[str, Any]:
    """Return the role after defaults as plain data, without where its file was found."""
    values = dataclasses.asdict(role)
    values.pop("file")
    # What happens to the AMI after it is made (copies, deprecation, protection) does not change it.
    for after in ("copy_kms_key_ids", "deprecate_after_days", "deregistration_protection"):
        values.pop(after)
    if values["root_kms_key_id"] is None:
        values.pop("root_kms_key_id")  # the default key, as before the key could be chosen
    if list(values["instance_types"]) == [role.instance_type]:
        # instance_type alone, as before instance_types existed: its fingerprint stays the same.
        values.pop("instance_types")
    return values


def template_sources(templates_dir: Path = TEMPLATES_DIR) -> dict[str, str]:
    """Return the sha256 of every template source, by file name."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(templates_dir.iterdir())
        if path.is_file()
    }


def fingerprint(
    role: Role, base_ami: str, templates_dir: Path = TEMPLATES_DIR, sources: dict[str, str] | None = None
) -> Fingerprint:
    """Return ``role``'s fingerprint when built on ``base_ami``."""
    inputs = {
        "format": FORMAT,
        "tool": __version__,
        "role": role_values(role),
        "templates": sources if sources is not None else template_sources(templates_dir),
        "scripts": {s.name: s.sha256 for s in render_role(role, templates_dir)},
        "base_ami": base_ami,
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    value = hashlib.sha256(canonical.encode()).hexdigest()[:LENGTH]
    return Fingerprint(role.name, value, base_ami, inputs)
