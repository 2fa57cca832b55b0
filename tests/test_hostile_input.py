"""Hostile input fails fast: exit 2, one line naming the file, no traceback, no hang.

Role files come from pull requests, options from CI scripts. Each class below once got
through (validated, then crashed or hung later) or made `validate` spin for minutes.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from builder.aws.resources import ssh_cidr, ssh_ranges
from builder.errors import InvalidInput, RoleInvalid
from builder.keys import KeyPair
from builder.pipeline import BuildOptions
from builder.roles import load_roles
from builder.userdata import builder_user_data
from builder.yamlload import MAX_BYTES, MAX_DEPTH, MAX_NODES
from tests.conftest import GOOD_ROLE, run_cli

# Long enough for a loaded CI machine to start Python, short of the minutes a bomb took.
HANG = 10

GOOD_TEXT = """description: test role
volume: {device: /dev/sdf, mount_point: /data, size_gib: 10}
externalize: [/srv/app]
"""


def alias_bomb(levels: int = 9) -> str:
    """Return YAML whose last anchor expands to 9**levels strings ("billion laughs")."""
    lines = ["x-0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x-{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (id, role file bytes, words the one-line message carries)
HOSTILE: list[tuple[str, bytes, str]] = [
    ("too large", (GOOD_TEXT + "# " + "x" * MAX_BYTES + "\n").encode(), "larger than 256 KiB"),
    # The bomb where it hurt: under a key the schema walks and prints (tags' values).
    ("alias bomb", (GOOD_TEXT + "tags:\n" + alias_bomb().replace("x-", "  k")).encode(), "alias bomb"),
    ("alias bomb, unknown key", (alias_bomb() + GOOD_TEXT).encode(), "alias bomb"),
    ("recursive alias", (GOOD_TEXT + "tags: &t {k: *t}\n").encode(), "refers to a value that contains it"),
    ("too many values", (GOOD_TEXT + "packages: [" + ", ".join(["a"] * MAX_NODES) + "]\n").encode(), "values"),
    ("deep nesting", (GOOD_TEXT + f"tags: {nested(5000)}\n").encode(), f"nest more than {MAX_DEPTH} deep"),
    (
        "deep through an alias",
        (f"x-deep: &d {nested(20)}\n" + GOOD_TEXT + "tags: {k: [" + "[" * 15 + "*d" + "]" * 15 + "]}\n").encode(),
        f"nest more than {MAX_DEPTH} deep",
    ),
    ("lone surrogate", GOOD_TEXT.replace("test role", '"test \\ud800 role"').encode(), "lone surrogate"),
    ("lone surrogate in a key", (GOOD_TEXT + 'tags: {"k\\udfff": v}\n').encode(), "lone surrogate"),
    ("latin-1", GOOD_TEXT.replace("test role", "caf\xe9").encode("latin-1"), "not UTF-8"),
    ("utf-16", GOOD_TEXT.encode("utf-16"), "not UTF-8"),
]


@pytest.mark.parametrize("verb", ["validate", "render"])
@pytest.mark.parametrize(("content", "words"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_role_file_exits_2_at_once_naming_the_file(
    roles_dir: Path, verb: str, content: bytes, words: str
) -> None:
    (roles_dir / "r.yaml").write_bytes(content)
    started = time.monotonic()
    done = run_cli(verb, *(["r"] if verb == "render" else []), "--roles-dir", str(roles_dir), timeout=HANG)
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    first = done.stderr.splitlines()[0]
    assert "r.yaml: " in first and words in first, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert done.stdout == ""
    logging.getLogger(__name__).info("%s %s: exit 2 after %.2f s", verb, words, took)


def test_hostile_defaults_file_is_named(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    write_role("r", GOOD_ROLE)
    (roles_dir / "defaults.yaml").write_text("tags:\n" + alias_bomb().replace("x-", "  k"))
    done = run_cli("validate", "--roles-dir", str(roles_dir), timeout=HANG)
    assert done.returncode == 2 and "defaults.yaml: " in done.stderr and "alias bomb" in done.stderr, done.stderr


def test_the_limits_leave_room_for_real_roles(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    first = "  - {path: /srv/site0, owner: &u www-data, group: &g www-data, mode: &m '0750'}\n"
    paths = first + "".join(f"  - {{path: /srv/site{i}, owner: *u, group: *g, mode: *m}}\n" for i in range(1, 100))
    packages = "packages: [" + ", ".join(f"pkg{i}" for i in range(300)) + "]\n"
    write_role("r", GOOD_TEXT.replace("externalize: [/srv/app]\n", "externalize:\n" + paths) + packages)
    (role,) = load_roles(["r"], roles_dir)
    assert len(role.externalize) == 100 and role.externalize[99].owner == "www-data"


# ---------------------------------------------------------------- rules on the merged role


def role_with(**changes: Any) -> dict[str, Any]:
    role = copy.deepcopy(GOOD_ROLE)
    role.update(changes)
    return role


def problems(roles_dir: Path, write_role: Callable[..., Path], role: dict[str, Any]) -> list[str]:
    write_role("r", role)
    with pytest.raises(RoleInvalid) as caught:
        load_roles(["r"], roles_dir)
    return [str(p) for p in caught.value.problems]


def tags(count: int) -> dict[str, str]:
    return {f"t{i}": "v" for i in range(count)}


LONG_PATHS = [f"/srv/{'p' * 200}{i}" for i in range(3)]  # 3 x 206 characters: 3 paths tags

# (id, role changes, key, words): each refused, naming file and key
REFUSED = [
    ("35 tags", {"tags": tags(35)}, "tags", "at most 34"),
    ("long paths leave room for fewer", {"tags": tags(33), "externalize": LONG_PATHS}, "tags", "at most 32"),
    ("aws: any case", {"tags": {"AWS:x": "y"}}, "tags", "aws: (any case"),
    ("Aws: mixed case", {"tags": {"Aws:cloudformation:stack": "y"}}, "tags", "aws:"),
    ("tag key 129", {"tags": {"k" * 129: "v"}}, "tags", "at most 128"),
    ("tag value 257", {"tags": {"k": "v" * 257}}, "tags.k", "at most 256"),
    ("mount point over tag length", {"volume": {"mount_point": "/" + "m" * 300}}, "volume.mount_point", "256"),
    (
        "mount unit name too long",
        {"volume": {"mount_point": "/" + "-".join(["ab"] * 45)}},
        "volume.mount_point",
        "systemd mount unit name",
    ),
    ("component over NAME_MAX", {"externalize": ["/srv/" + "n" * 256]}, "externalize[0]", "NAME_MAX"),
    ("multibyte component", {"externalize": ["/srv/" + "é" * 128]}, "externalize[0]", "256 bytes"),
    ("path over PATH_MAX", {"externalize": ["/srv" + ("/" + "é" * 100) * 21]}, "externalize[0]", "PATH_MAX"),
    (
        "target over PATH_MAX",
        {
            "volume": {"mount_point": "/" + "/".join(["m" * 60] * 4)},
            "externalize": ["/srv" + "/abcdefgh" * 440],
        },
        "externalize[0]",
        "on the volume it becomes",
    ),
]


@pytest.mark.parametrize(("changes", "key", "words"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_limits_of_ec2_and_linux_are_refused(
    roles_dir: Path, write_role: Callable[..., Path], changes: dict[str, Any], key: str, words: str
) -> None:
    role = role_with(**changes)
    if "volume" in changes:
        role["volume"] = {**GOOD_ROLE["volume"], **changes["volume"]}
    found = problems(roles_dir, write_role, role)
    assert [p for p in found if f"r.yaml: {key}: " in p and words in p], found


def test_defaults_tags_count_too(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    (roles_dir / "defaults.yaml").write_text("tags: {" + ", ".join(f"d{i}: v" for i in range(20)) + "}\n")
    found = problems(roles_dir, write_role, role_with(tags=tags(15)))
    assert any("r.yaml: tags: 35 tags (with roles/defaults.yaml's), but a role may have at most 34" in p for p in found)


@pytest.mark.parametrize(
    "changes",
    [{"tags": tags(34)}, {"tags": tags(32), "externalize": LONG_PATHS}, {"tags": {"awsome:x": "y"}}],
    ids=["34 tags", "32 tags, long paths", "aws-like key"],
)
def test_up_to_the_limits_is_fine(roles_dir: Path, write_role: Callable[..., Path], changes: dict[str, Any]) -> None:
    write_role("r", role_with(**changes))
    assert load_roles(["r"], roles_dir)


# (path, words of its reason): what breaks boot, networking, logins or packages on 12 and 13
PROTECTED = [
    ("/etc/netplan", "for networking"),
    ("/etc/network/interfaces.d", "for networking"),
    ("/etc/systemd/network", "to boot"),
    ("/etc/resolv.conf", "for networking"),
    ("/etc/dhcp", "for networking"),
    ("/etc/NetworkManager", "for networking"),
    ("/etc/cloud", "for networking"),
    ("/etc/hosts", "for networking"),
    ("/etc/nftables.conf", "for the firewall"),
    ("/etc/iptables", "for the firewall"),
    ("/etc/fstab", "to boot"),
    ("/etc/default/grub", "to boot"),
    ("/etc/grub.d", "to boot"),
    ("/boot", "to boot"),
    ("/etc/init.d", "to boot"),
    ("/etc/systemd/system", "to boot"),
    ("/etc/tmpfiles.d", "to boot"),
    ("/etc/ssh", "to log in"),
    ("/etc/sudoers.d", "to log in"),
    ("/etc/passwd", "to log in"),
    ("/etc/shadow", "to log in"),
    ("/var/lib/dpkg", "to manage packages"),
    ("/etc/apt", "to manage packages"),
    ("/usr/local/lib", "to boot"),
]


@pytest.mark.parametrize(("path", "reason"), PROTECTED, ids=[p[0] for p in PROTECTED])
def test_protected_paths_are_refused_with_their_reason(
    roles_dir: Path, write_role: Callable[..., Path], path: str, reason: str
) -> None:
    found = problems(roles_dir, write_role, role_with(externalize=[path]))
    assert [p for p in found if "r.yaml: externalize[0]: cannot externalize" in p and reason in p], found
    assert all("\n" not in p for p in found)


# ---------------------------------------------------------------- command-line numbers


NUMBERS = [
    ("build", "--timeout", "0", "more than 0"),
    ("build", "--timeout", "-60", "more than 0"),
    ("build", "--timeout", "nan", "more than 0"),
    ("build", "--timeout", "1e300", "7 days"),
    ("build", "--ssh-timeout", "0", "more than 0"),
    ("build", "--ssh-port", "0", "1 to 65535"),
    ("build", "--ssh-port", "65536", "1 to 65535"),
    ("audit", "--ssh-port", "-1", "1 to 65535"),
]


@pytest.mark.parametrize(("verb", "flag", "value", "words"), NUMBERS, ids=[f"{n[1]} {n[2]}" for n in NUMBERS])
def test_bad_numbers_exit_2_before_any_cloud_call(verb: str, flag: str, value: str, words: str) -> None:
    args = [verb, "r"] if verb == "build" else [verb, "--instance", "i-0123456789abcdef0"]
    # An endpoint nobody listens on: reaching it would fail differently, and later.
    done = run_cli(*args, f"{flag}={value}", "--endpoint-url", "http://127.0.0.1:9", timeout=HANG)
    assert done.returncode == 2, done.stderr
    assert flag in done.stderr and words in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"timeout": -1}, {"timeout": float("nan")}, {"ssh_timeout": 0}, {"ssh_port": 70000}],
)
def test_build_options_refuse_what_would_disarm_the_deadman_switch(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        BuildOptions(**options)


def test_deadman_switch_is_always_armed() -> None:
    login, host = KeyPair.generate("l"), KeyPair.generate("h")
    with pytest.raises(InvalidInput, match="dead-man switch"):
        builder_user_data(login, host, deadline_seconds=0)


# ---------------------------------------------------------------- SSH from the world


WORLD = ["0.0.0.0/0", "::/0", "0.0.0.0/1", "2000::/3", "1.0.0.0/8"]
NOT_WORLD = ["203.0.113.7/32", "2001:db8::1/128", "10.0.0.0/8", "fc00::/7", "198.51.100.0/24", "2001:db8::/32"]


@pytest.mark.parametrize("cidr", WORLD + NOT_WORLD)
def test_world_open_ssh_warns_alike_for_ipv4_and_ipv6(cidr: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="builder.pipeline"):
        assert ssh_cidr(cidr) == cidr
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if cidr in WORLD:
        assert len(warnings) == 1 and "SSH is open to " in warnings[0] and f"({cidr})" in warnings[0]
        assert "internet" in warnings[0] and "--ssh-cidr" in warnings[0]
    else:
        assert warnings == []


@pytest.mark.parametrize("cidr", ["203.0.113.7/32", "2001:db8::1/128"])
def test_ssh_rule_admits_ipv4_and_ipv6_alike(cidr: str) -> None:
    with mock_aws():
        client = boto3.client("ec2", region_name="eu-west-1")
        group = client.create_security_group(GroupName="g", Description="d")["GroupId"]
        client.authorize_security_group_ingress(
            GroupId=group, IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, **ssh_ranges(cidr)}]
        )
        rule = client.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"][0]
    admitted = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
        r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
    ]
    assert admitted == [cidr]
