"""Checks on the host machine: root, tools and the Debian packages that carry them."""

from __future__ import annotations

import os
import shutil

from builder.errors import EnvironmentProblem


def require_root(what: str) -> None:
    """Raise EnvironmentProblem unless running as root."""
    if os.geteuid() != 0:
        raise EnvironmentProblem(f"{what} needs root (namespaces, mounts, loop devices)", hint="run it with sudo")


def require_tools(**tools: str) -> None:
    """Raise EnvironmentProblem naming the Debian packages of the missing tools.

    Keyword arguments map a command to the Debian package that carries it.
    """
    missing = sorted({package for command, package in tools.items() if not _which(command)})
    if missing:
        names = ", ".join(c for c, p in tools.items() if p in missing)
        raise EnvironmentProblem(
            f"missing {names}", hint=f"install it: apt-get install {' '.join(missing)} (or run scripts/setup.sh)"
        )


def _which(command: str) -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which(command, path=path)
