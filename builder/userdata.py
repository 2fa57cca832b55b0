"""cloud-init user-data for a temporary builder instance (pure)."""

from __future__ import annotations

import yaml

from builder.errors import InvalidInput
from builder.keys import KeyPair


def builder_user_data(login_key: KeyPair, host_key: KeyPair, *, deadline_seconds: int | None = None) -> str:
    """Return ``#cloud-config`` user-data for a builder.

    It authorizes ``login_key`` for the image's default user, installs ``host_key`` as
    the instance's ed25519 host key (so the client can pin it instead of trusting on
    first use), and, with ``deadline_seconds``, arms a dead-man switch that powers the
    instance off when the build's time limit has passed even if the tool is gone (the
    instance is launched with shutdown behaviour ``terminate``). Raises InvalidInput for a
    deadline under 1 s, which would never arm it.
    """
    config: dict[str, object] = {
        "ssh_authorized_keys": [login_key.public_line],
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],
        "ssh_keys": {"ed25519_private": login_key_text(host_key), "ed25519_public": host_key.public_line},
        "disable_root": True,
    }
    if deadline_seconds is not None:
        if deadline_seconds < 1:
            raise InvalidInput(f"deadline {deadline_seconds} s: the dead-man switch needs at least 1 s")
        config["runcmd"] = [
            [
                "systemd-run",
                "--unit=ebsrole-deadline",
                f"--on-active={int(deadline_seconds)}s",
                "/bin/systemctl",
                "poweroff",
            ],
        ]
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False, width=1000)


def login_key_text(key: KeyPair) -> str:
    """Return the private key text as cloud-init's ssh_keys wants it."""
    return key.private_openssh if key.private_openssh.endswith("\n") else key.private_openssh + "\n"
