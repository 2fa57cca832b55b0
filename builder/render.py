"""Render a role's provisioning scripts from the Jinja2 templates (pure: no I/O but reads).

Rendering is strict: an undefined name is an error (``StrictUndefined``), and every
value interpolated with ``{{ }}`` must go through the ``sh`` (or ``sharray``) filter,
which shell-quotes it; anything else stops the render. Control characters never
reach here: role validation rejects them.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from builder import __version__
from builder.errors import TemplateError
from builder.roles import PACKAGE_DIR, Role

# Package data: shipped in the wheel, next to the code that reads them.
TEMPLATES_DIR = PACKAGE_DIR / "templates"

# The scripts, in the order the builder runs them.
SCRIPTS = ("provision.sh", "verify.sh", "image-hygiene.sh")


@dataclass(frozen=True)
class Script:
    """A rendered script: its file name, its text and the text's sha256."""

    name: str
    text: str
    sha256: str

    @classmethod
    def of(cls, name: str, text: str) -> Script:
        """Return a Script for ``text`` with its digest computed."""
        return cls(name, text, hashlib.sha256(text.encode()).hexdigest())


class Quoted(str):
    """A string that is already safe to paste into bash."""

    __slots__ = ()


def sh(value: Any) -> Quoted:
    """Jinja filter: quote one value for bash."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    return Quoted(shlex.quote(str(value)))


def sharray(values: Iterable[Any]) -> Quoted:
    """Jinja filter: quote each value, for the body of a bash array ``( ... )``."""
    return Quoted(" ".join(sh(v) for v in values))


def _only_quoted(value: Any) -> Any:
    if isinstance(value, Quoted):
        return value
    raise jinja2.TemplateError(f"value {value!r} is interpolated without the sh filter")


def environment(templates_dir: Path = TEMPLATES_DIR) -> jinja2.Environment:
    """Return the strict Jinja2 environment the templates are rendered with."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - bash, not HTML; values are shell-quoted instead
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_only_quoted,
        # bash's ${#array[@]} would open a Jinja comment; templates need no comments
        # that bash cannot also carry, so Jinja's comment syntax is moved out of the way.
        comment_start_string="<#jinja#",
        comment_end_string="#jinja#>",
    )
    env.filters["sh"] = sh
    env.filters["sharray"] = sharray
    return env


def context(role: Role) -> dict[str, Any]:
    """Return the values a template sees for ``role``."""
    mount_point = role.volume.mount_point
    return {
        "version": __version__,
        "role": role.name,
        # The role by its name, not by where this process found it: the same role renders
        # the same scripts from any directory (and so has one fingerprint).
        "role_file": f"roles/{role.name}.yaml",
        "packages": list(role.packages),
        "services": list(role.services),
        "device": role.volume.device,
        "mount_point": mount_point,
        "filesystem": role.volume.filesystem,
        "paths": [
            {
                "path": p.path,
                "target": p.target(mount_point),
                "owner": p.owner or "",
                "group": p.group or "",
                "mode": p.mode or "",
            }
            for p in role.externalize
        ],
    }


def render_role(role: Role, templates_dir: Path = TEMPLATES_DIR) -> tuple[Script, ...]:
    """Return the role's scripts, in the order they run.

    Raises TemplateError when a template is broken (undefined name, unquoted value).
    """
    env = environment(templates_dir)
    values = context(role)
    scripts = []
    for name in SCRIPTS:
        try:
            text = env.get_template(f"{name}.j2").render(values)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{name}.j2", str(exc)) from exc
        scripts.append(Script.of(name, text))
    return tuple(scripts)
